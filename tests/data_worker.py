"""Run under a launcher: this rank's train loader, built as the trainer builds it from the launcher's RANK and
WORLD_SIZE, reads one epoch's steps (batch 1); rank r saves its samples' token ids to ``--out DIR/rank{r}.pt``.

    torchrun ... tests/data_worker.py --out DIR --shards SPEC
"""

import sys

import torch
from test_data_integrity import SPEC, TOKENIZER, _texts

from fastclip.cli import parse_args
from fastclip.data.build import build_loaders
from fastclip.world import close_distributed, join_world


def main(argv):
    out, spec = argv[argv.index("--out") + 1], argv[argv.index("--shards") + 1]
    cfg = parse_args(["--data.train_shards", spec, "--data.val_shards", "null", "--data.batch_size", "1",
                      "--data.loader", "torch", "--data.shuffle_buffer", "16", "--data.num_threads", "1"])  # fmt: skip
    world = join_world()
    loader, _ = build_loaders(
        cfg, rank=world.rank, world_size=world.world_size, device=world.device, image=SPEC, tokenizer=TOKENIZER
    )
    try:
        batches = iter(loader)
        steps = loader.samples_per_epoch // world.world_size
        seen = [t for _ in range(steps) for t in _texts(next(batches))]
        torch.save(seen, f"{out}/rank{world.rank}.pt")
    finally:
        loader.close()
        close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
