"""Run under a launcher: one forward/backward of the real Trainer on a fixed global batch; rank 0 saves the
loss (mean over ranks) and every parameter gradient (as the engine leaves it, averaged) to ``--out FILE``.

    deepspeed --num_gpus K tests/grad_worker.py --out FILE --global_batch G [--section.field VALUE ...]
"""

import sys

import torch
import torch.distributed as dist

from fastclip.cli import parse_args
from fastclip.data.batch import Batch
from fastclip.trainer import Trainer
from fastclip.world import close_distributed, join_world


def fixed_global_batch(trainer: Trainer, size: int) -> Batch:
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(size, 3, trainer.image.size, trainer.image.size, generator=g)
    colours, shapes = ["red", "green", "blue", "black"], ["circle", "square", "star"]
    captions = [f"a {colours[i % 4]} {shapes[(i // 4) % 3]} number {i}" for i in range(size)]
    return Batch(images=images, texts=trainer.tokenizer(captions))


def main(argv):
    out = argv[argv.index("--out") + 1]
    global_batch = int(argv[argv.index("--global_batch") + 1])
    rest = [
        a
        for i, a in enumerate(argv)
        if a not in ("--out", "--global_batch") and argv[i - 1] not in ("--out", "--global_batch")
    ]
    cfg = parse_args(rest)
    world = join_world()
    trainer = Trainer(cfg, world)
    try:
        full = fixed_global_batch(trainer, global_batch)
        n = global_batch // world.world_size
        rows = slice(world.rank * n, (world.rank + 1) * n)
        out_dict = trainer.forward(Batch(images=full.images[rows], texts=full.texts[rows]))
        loss, _ = trainer.compute_loss(out_dict)
        trainer.backward(loss)
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        grads = {name: p.grad.detach().clone() for name, p in trainer.engine.module.named_parameters()}
        if world.is_main:
            torch.save({"loss": loss / world.world_size, "grads": grads}, out)
    finally:
        trainer.close()
        close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
