"""Train a CLIP model: ``deepspeed [--num_gpus K] fastclip/train.py [--config FILE] [--section.field VALUE ...]``.

With no arguments it trains the small demo model on the synthetic world (generated once). Also runs as
``python -m fastclip.train`` (one rank) and under ``torchrun``.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script: fastclip/ itself must not shadow top-level modules

from fastclip.cli import HelpRequested, parse_args, usage  # noqa: E402
from fastclip.errors import ConfigError  # noqa: E402
from fastclip.preflight import check_inputs  # noqa: E402


def _fail(message: str, code: int = 2, *, any_rank: bool = False) -> None:
    """Exit with one line on stderr: from rank 0 for what every rank finds alike, from the rank itself (named)
    for what one rank may meet alone (its own data)."""
    rank = os.environ.get("RANK", "0")
    if any_rank or rank == "0":
        print(f"fastclip{f' (rank {rank})' if any_rank else ''}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config(argv: list[str]):
    """The run config, checked against the files it names (every rank, before any process group or model)."""
    from fastclip import console
    from fastclip.data.synthetic import use_demo_world

    console.setup(int(os.environ.get("RANK", "0")))  # the checks' own lines (a damaged shard set aside) too
    try:
        cfg = parse_args(argv)
        check_inputs(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
        return use_demo_world(cfg)
    except HelpRequested:
        if os.environ.get("RANK", "0") == "0":
            print(usage())
        sys.exit(0)
    except ConfigError as e:
        _fail(str(e))


def main(argv: list[str] | None = None) -> dict[str, float]:
    cfg = _config(sys.argv[1:] if argv is None else argv)

    from fastclip.checkpoint import CheckpointError
    from fastclip.data.skips import DataBroken
    from fastclip.distributed import close_distributed, init_distributed
    from fastclip.errors import OutOfMemory, TrainingDiverged
    from fastclip.trainer import Trainer

    try:
        world = init_distributed()
    except ConfigError as e:  # MASTER_PORT taken
        _fail(str(e))
    trainer = None
    try:
        trainer = Trainer(cfg, world)
        return trainer.train()
    except CheckpointError as e:
        _fail(str(e), any_rank=True)
    except ConfigError as e:
        _fail(str(e))
    except TrainingDiverged as e:
        _fail(str(e), code=1)
    except (DataBroken, OutOfMemory) as e:  # one rank's data, one rank's memory
        _fail(str(e), code=1, any_rank=True)
    finally:
        if trainer is not None:
            trainer.close()
        close_distributed()


if __name__ == "__main__":
    main()
