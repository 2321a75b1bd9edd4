"""fastclip's bf16 train step does open_clip's work and no more: its towers' matmul FLOPs (forward and backward)
equal open_clip's under autocast, and every matmul, convolution and attention of the step runs on bf16 operands.

Checked on the CPU, op by op as the dispatcher sees them, because on a GPU either failure is a silent slowdown,
not an error: a stray fp32 matmul runs at a sixteenth of the bf16 tensor-core rate, recomputed or duplicated
work costs its FLOPs again. Nothing is timed here (benchmarks/bench_train_step.py times the step).
"""

from __future__ import annotations

import itertools

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from runs import small_run_args

# the ops that run on tensor cores on a GPU (aten names; SDPA's CPU and CUDA variants share the prefix)
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward")
ATTENTION_PREFIX = "_scaled_dot_product"


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, with the CPU attention kernel's formulas (it has the CUDA kernels' only): attention's
    two matmuls a head, forward and backward, count on both sides."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    })  # fmt: skip


class OperandDtypes(TorchDispatchMode):
    """The floating dtypes of each matmul-class op's operands, by op name. Attention's 4-D tensors are its
    operands (query, key, value, output and their gradients); its 3-D log-sum-exp is kept in fp32 by design."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMUL_OPS or name.startswith(ATTENTION_PREFIX):
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if name.startswith(ATTENTION_PREFIX):
                tensors = [t for t in tensors if t.dim() == 4]
            self.seen.setdefault(name, set()).update(t.dtype for t in tensors)
        return func(*args, **(kwargs or {}))


def _fastclip_step(world, world_dir, tmp_path):
    """A warmed-up bf16 ZeRO-2 trainer on the tiny model and a function running one step on a fixed batch."""
    from fastclip.cli import parse_args
    from fastclip.data.batch import Batch
    from fastclip.trainer import Trainer

    cfg = parse_args(small_run_args(world_dir, tmp_path, steps=10) + ["--log.every", "1000"])
    trainer = Trainer(cfg, world)
    batch = next(iter(trainer.train_loader))
    fixed = itertools.repeat(Batch(images=batch.images, texts=batch.texts))
    trainer.train_step(fixed)  # the first step allocates the optimizer's state
    return trainer, batch, lambda: trainer.train_step(fixed)


def _open_clip_flops(cfg, batch) -> tuple[int, int]:
    """open_clip's forward and backward of the same architecture under autocast bf16 (open_clip_train's
    amp_bf16), with ClipLoss: (total FLOPs, the FLOPs of the loss's logits)."""
    import open_clip

    from fastclip.model import resolve_model_name

    model = open_clip.create_model(resolve_model_name(cfg.model.name), output_dict=True,
                                   force_image_size=cfg.model.force_image_size)  # fmt: skip
    model.train()
    with _flop_counter() as counter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch.images, batch.texts)
            loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"].exp())
        loss.backward()
    n, d = out["image_features"].shape
    # ClipLoss on one rank: image @ text.T and text @ image.T forward; each matmul's two input gradients backward
    return counter.get_total_flops(), 2 * (2 * n * n * d) * 3


def test_bf16_step_does_open_clips_matmul_work_in_bf16(single_rank, world_dir, tmp_path):
    trainer, batch, step = _fastclip_step(single_rank, world_dir, tmp_path)
    try:
        assert trainer.precision == "bf16" and trainer.stage == 2
        dtypes = OperandDtypes()
        with _flop_counter() as counter, dtypes:
            step()
        ours = counter.get_total_flops()  # the fused loss's logits are inside its own op, not counted here
    finally:
        trainer.close()
    assert {"mm", "addmm", "convolution", "convolution_backward"} <= dtypes.seen.keys(), dtypes.seen
    assert any(name.startswith(ATTENTION_PREFIX) for name in dtypes.seen), dtypes.seen
    not_bf16 = {name: kinds for name, kinds in dtypes.seen.items() if kinds != {torch.bfloat16}}
    assert not not_bf16, f"matmul-class ops with operands not in bf16: {not_bf16}"
    attention = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    assert attention > 0, counter.get_flop_counts()["Global"]  # the towers' attention is in the count
    theirs, logits = _open_clip_flops(trainer.cfg, batch)
    assert ours == theirs - logits, (ours, theirs, logits)
