"""Run under a launcher: resume a run (``--checkpoint.resume`` among the run arguments), save the whole fp32
weights the engine loaded (rank 0, to ``--out FILE``, with the step), then train on to ``train.steps``.

    deepspeed --num_gpus K tests/resume_worker.py --out FILE [--section.field VALUE ...]
"""

import sys

import torch

from fastclip.cli import parse_args
from fastclip.trainer import Trainer
from fastclip.world import close_distributed, join_world


def main(argv):
    out = argv[argv.index("--out") + 1]
    cfg = parse_args([a for i, a in enumerate(argv) if "--out" not in (a, argv[i - 1])])
    world = join_world()
    trainer = Trainer(cfg, world)
    try:
        state = trainer.checkpoints._full_state()  # a collective under ZeRO-3: every rank takes part
        if world.is_main:
            torch.save({"step": trainer.step, "state": state}, out)
        trainer.train()
    finally:
        trainer.close()
        close_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
