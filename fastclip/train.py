"""Train a CLIP model: ``deepspeed [--num_gpus K] fastclip/train.py [--config FILE] [--section.field VALUE ...]``.

With no arguments it trains the small demo model on the synthetic world (generated once). Also runs as
``python -m fastclip.train`` (one rank) and under ``torchrun``.
"""

from __future__ import annotations

import gc
import os
import sys
from types import SimpleNamespace

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # run as a script: fastclip/ itself must not shadow top-level modules

from fastclip.cli import HelpRequested, parse_args, usage  # noqa: E402
from fastclip.errors import ConfigError  # noqa: E402
from fastclip.preflight import check_inputs  # noqa: E402


def _fail(message: str, code: int = 2, *, any_rank: bool = False, speaker: bool | None = None) -> None:
    """Exit with one line on stderr: from rank 0 for what every rank finds alike, from the rank itself (named)
    for what one rank may meet alone (its own data); ``speaker`` overrides who says it."""
    rank = os.environ.get("RANK", "0")
    if speaker if speaker is not None else (any_rank or rank == "0"):
        print(f"fastclip{f' (rank {rank})' if any_rank else ''}: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _config(argv: list[str]):
    """The run config, checked against the files it names (every rank, before any process group or model); the demo
    world's first, so that its counts give the run's length there too."""
    from fastclip import console
    from fastclip.benchmark_try import settings
    from fastclip.data.synthetic import use_demo_world
    from fastclip.world import slurm_alone

    console.setup(int(os.environ.get("RANK", "0")))  # the checks' own lines (a damaged shard set aside) too
    if alone := slurm_alone(dict(os.environ)):
        console.say(alone)
    try:
        cfg = use_demo_world(parse_args(argv))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_inputs(cfg, world_size=world_size)
        for setting in settings(cfg):  # --train.benchmark_try: each setting's config against its files too
            check_inputs(setting.cfg, world_size=world_size)
        return cfg
    except HelpRequested:
        if os.environ.get("RANK", "0") == "0":
            print(usage())
        sys.exit(0)
    except ConfigError as e:
        _fail(str(e))


def _peer_gone(error: BaseException) -> bool:
    """A collective that failed because another rank's connection closed (its process or node is gone)."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("connection closed", "connection reset", "broken pipe", "gloo", "nccl")
    )


def _shard_list(cfg) -> tuple[int, str]:
    """The train shards the spec matches on this node: how many, and their list's hash (listed once: the
    rendezvous and the checkpoints' data identity both use it)."""
    from fastclip.data.shard_specs import shard_list_digest

    return shard_list_digest(cfg.data.train_shards, field="data.train_shards") if cfg.data.train_shards else (0, "")


def _identity(cfg, shard_list: tuple[int, str]) -> dict:
    """What every rank must agree on: its run config, and the train shards the spec matched on its node (a node
    that mounts an older copy of the set would read other samples under the same glob)."""
    count, digest = shard_list
    return {**cfg.to_dict(), "train shards found": f"{count} files, sha1 {digest}"}


def _join(cfg, shard_list: tuple[int, str]):
    """The world, and rank 0's hold on the run's folders: each refused in one line before any model."""
    from fastclip import run_folders
    from fastclip.world import RendezvousError, join_world

    try:
        world = join_world(_identity(cfg, shard_list), cfg.dist, deepspeed_file=cfg.deepspeed_config)
    except RendezvousError as e:  # ranks missing or disagreeing, MASTER_PORT taken
        _fail(str(e), speaker=e.speaker)
    try:
        return world, run_folders.hold(cfg, world)  # another run writing the same folders
    except ConfigError as e:
        _fail(str(e))


def _watch(cfg, world, run: SimpleNamespace):
    """This rank's watchdog; ``run.trainer`` is None while the rank starts up (a sweep's trainers are its own: it
    has started once it runs)."""
    from fastclip.checkpoint import read_latest
    from fastclip.watchdog import Watchdog

    def latest():  # kept in memory: read from the filesystem only before the trainer exists
        known = run.trainer.checkpoints.newest if run.trainer else None
        tag = None if known else read_latest(cfg.checkpoint.dir)
        return known or (os.path.join(cfg.checkpoint.dir, tag) if tag else None)

    def step():
        return run.trainer.step if run.trainer else (0 if cfg.train.benchmark_try else None)

    return Watchdog(world, cfg.dist, step=step, latest=latest).start()


def main(argv: list[str] | None = None) -> dict[str, float]:
    from fastclip.world import apply_launch_environment

    apply_launch_environment()  # srun without a launcher: SLURM's variables as torch's, before any rank is read
    args = sys.argv[1:] if argv is None else argv
    cfg = _config(args)

    from fastclip import benchmark, benchmark_sweep
    from fastclip.checkpoint import CheckpointError
    from fastclip.data.skips import DataBroken
    from fastclip.errors import OutOfMemory, TrainingDiverged
    from fastclip.preemption import EXIT_CODE, Preempted, StopRequests
    from fastclip.trainer import Trainer
    from fastclip.world import close_distributed

    shard_list = _shard_list(cfg)
    world, lock = _join(cfg, shard_list)
    run = SimpleNamespace(trainer=None, finished=False)
    watchdog = _watch(cfg, world, run)
    # taken from here on (benchmarks aside: nothing to save): a signal during start-up stops the ranks a few steps in
    stop = StopRequests(rank=world.rank, world_size=world.world_size, store=world.store,
                        grace_s=cfg.checkpoint.signal_grace_s)  # fmt: skip
    if not (cfg.train.benchmark or cfg.train.benchmark_try):
        stop.install()
    try:
        if cfg.train.benchmark_try:  # several settings, each its own trainer (fastclip/benchmark_sweep.py)
            metrics = benchmark_sweep.run(cfg, world, argv=args)
        else:
            run.trainer = Trainer(cfg, world, shard_list=shard_list[1])
            metrics = benchmark.run(run.trainer) if cfg.train.benchmark else run.trainer.train(stop)
        watchdog.finish()
        run.finished = True
        return metrics
    except Preempted as e:  # a requeued job goes on from its checkpoint
        watchdog.finish()
        run.finished = True
        _fail(str(e), code=EXIT_CODE)
    except (CheckpointError, DataBroken, OutOfMemory) as e:  # one rank's files, data or memory: named
        watchdog.fail(str(e))
        _fail(str(e), code=2 if isinstance(e, CheckpointError) else 1, any_rank=True)
    except (ConfigError, TrainingDiverged) as e:  # every rank alike: said once
        watchdog.fail(str(e))
        _fail(str(e), code=2 if isinstance(e, ConfigError) else 1)
    except Exception as e:
        if world.world_size > 1 and _peer_gone(e) and watchdog.await_verdict():
            raise  # not reached: the watchdog has named the lost rank and ended the process
        watchdog.fail(f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
        raise
    finally:
        watchdog.stop()
        if run.trainer is not None:
            run.trainer.close()
        stop.close()  # after the loader workers are gone, which ignore a stop signal until it
        if run.finished or world.world_size == 1:  # after a peer's loss the group cannot be torn down cleanly
            close_distributed()
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    try:
        main()
    finally:
        # the interpreter's collections at exit would walk every object torch, DeepSpeed and open_clip made: seconds
        # (4.8 of a 5.9 s stop on this CPU) out of a preempted job's grace, to free memory the exit frees anyway
        gc.freeze()
