"""fastclip/train.py with the CPU profiler over a few steps after the timed ones: the collectives' time per step.

    deepspeed [--num_gpus R | --hostfile F --no_ssh --node_rank N ...] benchmarks/profile_worker.py
        --profile-after S --profile-steps P --profile-out DIR  <train.py's arguments, --train.steps S+P>

Runs ``fastclip.train.main`` as train.py does (rendezvous, watchdog, trainer, loop, log lines, final checkpoint),
with two additions made here, in this process only: a wrapper around ``Trainer.train_step`` that starts
``torch.profiler`` before step S+1 and stops it after step S+P, and a ``fastclip.loss`` record_function around
``Trainer.compute_loss`` (a profiler label; with no profiler running it records nothing). Steps 1..S run with no
profiler and no added host sync, so the log line of step S gives a plain run's throughput; put ``log.every`` at a
divisor of S no smaller than P, so that no log line (and its host sync) falls among the profiled steps.

Each rank writes DIR/rank-R.json: ms per profiled step in the loss's collectives (its all-gathers and, with
``loss.gather_with_grad``, the all-reduce of their backward on gloo), in DeepSpeed's reductions (ZeRO's gradient
reduce and its grad-norm all-reduce) and in DeepSpeed's all-gathers (ZeRO-1/2's updated partitions), the wall time
of a profiled step, and the collective events by name.

A collective's time is that of the backend's own event (``gloo:all_gather``, ``gloo:all_reduce``, ``nccl:...``):
torch opens it when the op is queued and closes it when the op completes, so it covers the time the calling thread
waits, including the wait for the slowest rank to arrive. The dispatcher's ``c10d::allreduce_`` etc. only queue
the op. An event is the loss's when it starts inside ``_GatherWithGrad``, ``_GatherWithGradBackward`` (the
autograd function of fastclip/distributed.py) or ``fastclip.loss``; every other one is DeepSpeed's. Written for
the CPU (gloo) runs of benchmarks/bench_scaling.py: on CUDA a collective's work is a kernel on its own stream, to be
read from ``ProfilerActivity.CUDA``'s NCCL kernels instead.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

LOSS_RANGES = ("_GatherWithGrad", "_GatherWithGradBackward", "fastclip.loss")
GATHERS = ("all_gather", "allgather", "_allgather_base", "all_gather_into_tensor", "all_gather_single")
REDUCES = ("all_reduce", "allreduce", "reduce_scatter", "reduce")
DEEPSPEED = {"reduce": "deepspeed_reduce_ms", "allgather": "deepspeed_allgather_ms"}  # outside the loss, by kind


def _option(argv: list[str], name: str) -> str:
    i = argv.index(name)
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def is_collective(name: str) -> bool:
    """The backend's own event of a collective: 'gloo:all_reduce', 'nccl:all_gather', 'mpi:...'."""
    return name.split(":")[0] in ("gloo", "nccl", "mpi", "ucc", "xccl")


def kind_of(name: str) -> str:
    op = name.split(":", 1)[1]
    if any(op.startswith(g) for g in GATHERS):
        return "allgather"
    if any(op.startswith(r) for r in REDUCES):
        return "reduce"
    return "other"


def summarize(events, steps: int) -> dict:
    """ms per step of the profiled events: the loss's all-gathers (with their backward), DeepSpeed's reductions
    and all-gathers, anything else collective; and each event name's calls and ms per step, under the total that
    counted it ('gloo:all_reduce (loss_allgather)')."""
    loss = [(e.time_range.start, e.time_range.end) for e in events if e.name in LOSS_RANGES]
    totals = {"loss_allgather_ms": 0.0, "deepspeed_reduce_ms": 0.0, "deepspeed_allgather_ms": 0.0, "other_ms": 0.0}
    by_name: dict[str, dict] = {}
    for e in events:
        if not is_collective(e.name):
            continue
        ms = (e.time_range.end - e.time_range.start) / 1e3 / steps  # us -> ms per step
        if any(lo <= e.time_range.start <= hi for lo, hi in loss):
            key = "loss_allgather_ms"  # the loss's gathers, and their backward's all-reduce
        else:
            key = DEEPSPEED.get(kind_of(e.name), "other_ms")
        totals[key] += ms
        entry = by_name.setdefault(f"{e.name} ({key[:-3]})", {"calls_per_step": 0.0, "ms_per_step": 0.0})
        entry["calls_per_step"] += 1 / steps
        entry["ms_per_step"] += ms
    return {**totals, "events": by_name}


def main(argv: list[str]) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    from fastclip import train
    from fastclip.trainer import Trainer

    after, steps = int(_option(argv, "--profile-after")), int(_option(argv, "--profile-steps"))
    out = Path(_option(argv, "--profile-out"))
    train_step, compute_loss = Trainer.train_step, Trainer.compute_loss
    state: dict = {}

    def labelled_loss(self, out_):
        with record_function("fastclip.loss"):
            return compute_loss(self, out_)

    def profiled_step(self, batches):
        if self.step == after:
            state["prof"] = profile(activities=[ProfilerActivity.CPU])
            state["prof"].start()
            state["start"] = time.perf_counter()
        data_time = train_step(self, batches)
        if self.step == after + steps and "prof" in state:
            elapsed = time.perf_counter() - state["start"]
            prof = state.pop("prof")
            prof.stop()
            summary = summarize(prof.events(), steps)
            summary.update(rank=self.world.rank, world_size=self.world.world_size, steps=steps,
                           step_ms=elapsed * 1e3 / steps)  # fmt: skip
            out.mkdir(parents=True, exist_ok=True)
            (out / f"rank-{self.world.rank}.json").write_text(json.dumps(summary, indent=1))
        return data_time

    Trainer.train_step, Trainer.compute_loss = profiled_step, labelled_loss
    train.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
