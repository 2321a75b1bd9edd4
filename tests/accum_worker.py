"""Run under a launcher: for each case (ZeRO stage / loss.local_loss / loss.gather_with_grad), one optimizer step
of the real Trainer on the same samples in three ways: K=1 micro batch of 4n, K=4 micro batches of n accumulated
contrastively, and (first case only, to show the comparison tells them apart) K=4 independent, DeepSpeed's plain
accumulation. Rank 0 saves each way's parameter change, logged loss, grad norm and samples_seen to ``--out FILE``.

    torchrun --nproc-per-node R tests/accum_worker.py --out FILE --world DIR --log-folder DIR
        --cases 1/true/true,3/false/true [--ways one,contrastive,independent]

The step's 48 samples are the same on any number of ranks, so the K=1 way also compares world sizes and ZeRO stages.

A case is stage/local_loss/gather_with_grad[/precision[/loss backend[/loss kind]]] (fp32, auto, clip unless given).
"""

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from fastclip.cli import parse_args
from fastclip.data.batch import Batch
from fastclip.data.tokenizer import build_tokenizer
from fastclip.engine import full_params
from fastclip.trainer import Trainer
from fastclip.world import close_distributed, join_world

from runs import small_run_args

GLOBAL_BATCH = 48  # one step's samples, split among the ranks: micro batches of 12 on one rank, 6 on two, 3 on four
K = 4


def fixed_global_batch(trainer, size: int) -> Batch:
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(size, 3, trainer.image.size, trainer.image.size, generator=g)
    colours, shapes = ["red", "green", "blue", "black"], ["circle", "square", "star"]
    captions = [f"a {colours[i % 4]} {shapes[(i // 4) % 3]} number {i}" for i in range(size)]
    return Batch(images=images, texts=trainer.tokenizer(captions))


def _arg(argv, name, default=None):
    return argv[argv.index(name) + 1] if name in argv else default


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    with full_params(trainer.engine, trainer.stage):
        return {name: p.detach().float().clone() for name, p in trainer.engine.module.named_parameters()}


def one_step(args: list[str], world, rows: Batch, k: int, mode: str) -> dict:
    """One optimizer step on ``rows`` (this rank's samples) as ``k`` micro batches in ``mode``."""
    cfg = parse_args(args + ["--data.batch_size", str(len(rows.images) // k), "--train.grad_accum", str(k),
                             "--train.accum_mode", mode])  # fmt: skip
    trainer = Trainer(cfg, world)
    try:
        before = _params(trainer)
        n = len(rows.images) // k
        micro = [
            Batch(images=rows.images[i * n : (i + 1) * n], texts=rows.texts[i * n : (i + 1) * n]) for i in range(k)
        ]
        trainer.train_step(iter(micro))
        means = trainer.meters.collect()
        after = _params(trainer)
        return {"delta": {name: after[name] - before[name] for name in before}, "loss": means["loss"],
                "grad_norm": means["grad_norm"], "samples_seen": trainer.state.samples_seen}  # fmt: skip
    finally:
        trainer.close()


def base_args(argv) -> list[str]:
    """One step whose parameter changes carry the gradient: AdamW's first update is lr * g / (|g| + eps), with eps
    1 it follows the gradient's size, not only its sign; a clip that never clips keeps that size (ZeRO 1-3 then
    still compute the pre-clip norm, which is compared)."""
    base = small_run_args(Path(_arg(argv, "--world")), Path(_arg(argv, "--log-folder")), steps=4)
    return base + ["--train.precision", "fp32", "--data.val_shards", "null", "--data.loader", "torch",
                   "--optim.warmup_steps", "0", "--optim.weight_decay", "0", "--optim.eps", "1",
                   "--optim.lr", "1", "--optim.grad_clip", "1e6", "--checkpoint.export_open_clip", "false"]  # fmt: skip


def rows_of(base: list[str], world, global_batch: int) -> Batch:
    """This rank's rows of the fixed global batch."""
    # what fixed_global_batch reads of a trainer: the image size (small_run_args forces 32 px) and the tokenizer
    probe = SimpleNamespace(image=SimpleNamespace(size=32), tokenizer=build_tokenizer(parse_args(base).model.name))
    full = fixed_global_batch(probe, global_batch)
    n = global_batch // world.world_size
    rows = slice(world.rank * n, (world.rank + 1) * n)
    return Batch(images=full.images[rows], texts=full.texts[rows])


def main(argv):
    out, cases = _arg(argv, "--out"), _arg(argv, "--cases").split(",")
    ways_wanted = _arg(argv, "--ways", "one,contrastive,independent").split(",")
    base = base_args(argv)
    world = join_world()
    mine = rows_of(base, world, GLOBAL_BATCH)  # the same samples on any number of ranks
    results = {}
    try:
        for i, case in enumerate(cases):
            parts = case.split("/")
            stage, local, with_grad, precision, backend, kind = parts + ["fp32", "auto", "clip"][len(parts) - 3 :]
            args = base + ["--train.zero_stage", stage, "--loss.local_loss", local,
                           "--loss.gather_with_grad", with_grad, "--train.precision", precision,
                           "--loss.backend", backend, "--loss.kind", kind]  # fmt: skip
            ways = {"one": one_step(args, world, mine, 1, "contrastive")}
            if "contrastive" in ways_wanted:
                ways["contrastive"] = one_step(args, world, mine, K, "contrastive")
            if i == 0 and "independent" in ways_wanted:
                ways["independent"] = one_step(args, world, mine, K, "independent")
            results[case] = ways
        if world.is_main:
            torch.save(results, out)
    finally:
        close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
