"""Per-GPU batch sizes for the shipped ViT configs (configs/vit-*.yaml) on 80 GB cards, from numbers measured here.

Run on the CPU: ``.venv/bin/python benchmarks/size_configs.py`` (about a minute; one thread, one model at a time).

For each architecture:

- parameters: counted on the fp32 open_clip model from ``fastclip.model.build_model``;
- activations per sample: one forward of 1 image (3x224x224) + 1 tokenized caption under
  ``torch.autocast("cpu", dtype=torch.bfloat16)``, summing the bytes of every tensor autograd saves for backward
  (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once (by ``untyped_storage().data_ptr()``).
  Saved tensors that are the parameters or buffers themselves, or autocast's bf16 copies of the weights (and their
  transposes), are per step, not per sample: under DeepSpeed bf16 they are the bf16 weights already counted in the
  model states. They are left out of the per-sample figure and shown apart ("wts MiB");
- model states per GPU: DeepSpeed bf16 + AdamW keeps 16 bytes a parameter (bf16 weights 2, bf16 grads 2, fp32
  master 4, Adam m and v 8). ZeRO-1 partitions the 12 optimizer bytes over the ranks, ZeRO-2 the grads too, ZeRO-3
  everything. Printed for 8 ranks: one node of 8 GPUs, the smallest world the configs are written for (more nodes
  only shrink the partitioned share);
- batch: the largest multiple of 64 with states + batch x activations x SAFETY <= CARD - RESERVED. SAFETY covers
  the allocator's fragmentation, backward's transient activation grads, the loss (fastclip's fused loss holds no
  N x N logits: its memory is O(N x embed_dim)) and the data path's device buffers (DALI decode, prefetch). RESERVED
  is the CUDA context, cuBLAS workspaces, NCCL buffers and ZeRO-1/2's gradient reduce bucket (DeepSpeed's default
  reduce_bucket_size, 5e8 elements: 0.93 GiB in bf16). The fp32 gradient partition that ZeRO-1/2 make at the
  optimizer step (4 bytes a parameter / ranks) comes after the activations are freed, so it is not added.

No gradient checkpointing (fastclip has no switch for it yet). MiB and GiB are 2**20 and 2**30 bytes. The last
columns read configs/<arch>.yaml: the batch and ZeRO stage the config ships, to compare with the formula.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14")
CARD_GIB = 80.0  # H100 / A100 80 GB
RESERVED_GIB = 4.0  # CUDA context, cuBLAS workspaces, NCCL, DeepSpeed's gradient reduce bucket
SAFETY = 1.3  # on activations: fragmentation, backward's transients, the loss, the data path
RANKS = 8  # one node of 8 GPUs
MULTIPLE = 64
CAPTION = "a photo of a dog sitting on a red couch next to a window"
# autograd nodes that only view or cast their one input: a saved tensor reached from a parameter through these
# alone is a copy or a view of that weight (autocast's cached bf16 cast, its transpose for the matmul)
_VIEW_OR_CAST = {
    "ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0", "ExpandBackward0",
    "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1", "AliasBackward0", "UnsafeViewBackward0",
}  # fmt: skip


def state_bytes_per_param(stage: int, ranks: int = RANKS) -> float:
    """Model-state bytes per parameter on one GPU under DeepSpeed bf16 + AdamW at ZeRO ``stage``."""
    weights, grads, optim = 2.0, 2.0, 12.0  # bf16 weights, bf16 grads, fp32 master + Adam m, v
    if stage >= 1:
        optim /= ranks
    if stage >= 2:
        grads /= ranks
    if stage >= 3:
        weights /= ranks
    return weights + grads + optim


def _weight_derived(t: torch.Tensor) -> bool:
    """True for a saved tensor reached from a parameter through views and casts only."""
    fn = t.grad_fn
    while fn is not None:
        name = type(fn).__name__
        if name == "AccumulateGrad":
            return True
        if name not in _VIEW_OR_CAST:
            return False
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
    return False


def measure(arch: str, batch: int = 1, size: int = 224) -> dict:
    """Parameters and the bytes a bf16 autocast forward saves for backward, per sample and fixed."""
    from fastclip.config import ModelConfig
    from fastclip.data.tokenizer import build_tokenizer
    from fastclip.model import build_model

    model = build_model(ModelConfig(name=arch)).train()
    params = sum(p.numel() for p in model.parameters())
    fixed_ptrs = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    texts = build_tokenizer(arch)([CAPTION] * batch)
    per_sample: dict[int, int] = {}
    weights: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in fixed_ptrs or _weight_derived(t):
            weights[ptr] = storage.nbytes()
        elif ptr not in weights:
            per_sample[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, texts)
    del out, model
    gc.collect()
    return {
        "params": params,
        "act_per_sample": sum(per_sample.values()) / batch,
        "weights_saved": sum(weights.values()),
    }


def largest_batch(states_gib: float, act_bytes: float) -> int:
    room = (CARD_GIB - RESERVED_GIB - states_gib) * 2**30
    return max(int(room / (act_bytes * SAFETY)) // MULTIPLE * MULTIPLE, 0)


def shipped(arch: str) -> tuple[int, int] | None:
    """(batch, ZeRO stage) of configs/<arch>.yaml, if the config exists."""
    from fastclip.cli import parse_args

    path = ROOT / "configs" / f"{arch.lower()}.yaml"
    if not path.is_file():
        return None
    cfg = parse_args(["--config", str(path)])
    return cfg.data.batch_size, cfg.train.zero_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--batch", type=int, default=1, help="samples in the measured forward (per-sample = / batch)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine: one core is enough for batch-1 forwards

    print(
        f"card {CARD_GIB:g} GiB - {RESERVED_GIB:g} GiB reserved; batch = largest multiple of {MULTIPLE} with "
        f"states + batch x act x {SAFETY:g} <= {CARD_GIB - RESERVED_GIB:g} GiB; model states for {RANKS} ranks "
        f"(1 node x 8 GPUs); act: bf16 autocast forward, batch {args.batch}, no grad checkpointing"
    )
    stages = (0, 1, 2, 3)
    header = (
        f"{'arch':<9} {'params M':>8} {'act MiB':>8} {'wts MiB':>8} "
        + " ".join(f"{'Z' + str(s) + ' GiB':>7}" for s in stages)
        + " "
        + " ".join(f"{'B@Z' + str(s):>6}" for s in stages)
        + f" {'config':>12}"
    )
    print(header)
    print("-" * len(header))
    for arch in args.archs:
        m = measure(arch, batch=args.batch)
        act = m["act_per_sample"]
        states = [m["params"] * state_bytes_per_param(s) / 2**30 for s in stages]
        batches = [largest_batch(g, act) for g in states]
        ship = shipped(arch)
        ship_text = f"{ship[0]} @ Z{ship[1]}" if ship else "-"
        print(
            f"{arch:<9} {m['params'] / 1e6:8.1f} {act / 2**20:8.1f} {m['weights_saved'] / 2**20:8.0f} "
            + " ".join(f"{g:7.2f}" for g in states)
            + " "
            + " ".join(f"{b:6d}" for b in batches)
            + f" {ship_text:>12}"
        )
    print(
        "act MiB: saved-for-backward bytes per sample; wts MiB: weights (and autocast's bf16 copies of them) that "
        "the forward saves, per step, not per sample (left out of act); Z<k> GiB: model states per GPU at ZeRO-k; "
        "B@Z<k>: the formula's batch per GPU at ZeRO-k; config: batch @ stage in configs/<arch>.yaml"
    )


if __name__ == "__main__":
    main()
