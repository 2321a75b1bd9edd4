"""Throughput of the user's own run: ``--train.benchmark N`` measures N optimizer steps of exactly the configured run
(model, batch, accumulation, ZeRO stage, precision, world), after ``train.benchmark_warmup`` unmeasured ones, twice:

- data excluded: the same few batches, already on the device, over and over (what the model step can do);
- data included: the configured loader, as training reads it (what the run will do; the gap is the data path's).

Rank 0 prints one table and writes ``log.dir/benchmark.json`` (card, world layout, versions, both phases), and
where one more step's time goes (three on a CPU, averaged) by kind of work (fastclip/profiling.py: matmul,
attention, copies, optimizer, ...; on a GPU the kernels' time and how long the card idled) and by its 15 costliest
ops or kernels. Nothing is checkpointed, evaluated or exported. Step times come from one event per step on CUDA
(no host sync between steps, so the launch queue runs as in training) or the host clock on a CPU. Several settings
of the run tried in one invocation (``--train.benchmark_try``) are fastclip/benchmark_sweep.py's, with these
measurements.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from fastclip.console import say
from fastclip.data.batch import Batch
from fastclip.mfu import mfu, peak_memory_gb
from fastclip.profiling import breakdown_line, profile_step
from fastclip.trainer import Trainer


class _Clock:
    """A mark after each step: CUDA events recorded on the stream (read once at the end), else perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_times(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(self.marks)]
        return [b - a for a, b in itertools.pairwise(self.marks)]


def measure(trainer: Trainer, batches: Iterator[Batch], steps: int, warmup: int) -> dict:
    """``warmup`` unmeasured steps, then ``steps`` timed ones, from ``batches``; the figures of the timed ones."""
    for _ in range(warmup):
        trainer.train_step(batches)
    device = trainer.world.device
    clock, data_time = _Clock(device), 0.0
    peak_memory_gb(device)  # restart the peak count: the measured steps' own
    clock.mark()
    start = time.perf_counter()
    for _ in range(steps):
        data_time += trainer.train_step(batches)
        clock.mark()
    times = clock.step_times()
    wall = time.perf_counter() - start
    median = statistics.median(times)
    per_gpu = trainer.global_batch / median / trainer.world.world_size
    quantiles = statistics.quantiles(times, n=10) if len(times) > 1 else [median] * 9
    return {
        "samples_per_second_per_gpu": per_gpu,
        "samples_per_second": per_gpu * trainer.world.world_size,
        "mfu": mfu(per_gpu, trainer.flops_per_sample, trainer.peak_flops),
        "peak_memory_gb": peak_memory_gb(device),
        "data_time_share": data_time / wall,
        "step_time_median_s": median,
        "step_time_p10_s": quantiles[0],
        "step_time_p90_s": quantiles[-1],
        "step_time_spread": (max(times) - min(times)) / median,
    }


def versions() -> dict:
    import deepspeed
    import open_clip
    import triton

    return {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "triton": triton.__version__,
            "open_clip": open_clip.__version__}  # fmt: skip


def card(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    arch = platform.processor() or platform.machine()
    return f"CPU ({arch}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def table(report: dict) -> str:
    lines = [
        f"benchmark: {report['model']}, {report['card']}, {report['world']}; global batch {report['global_batch']}, "
        f"{report['steps']} steps after {report['warmup']} warm-up, {report['precision']}, ZeRO-{report['zero_stage']}",
        f"{'':16}{'samples/s/GPU':>14}{'MFU':>8}{'peak mem':>10}{'data share':>12}{'step p50':>11}{'p10-p90':>18}",
    ]
    for name, m in report["phases"].items():
        util = f"{100 * m['mfu']:.1f}%" if m["mfu"] is not None else "—"
        mem = f"{m['peak_memory_gb']:.1f} GB" if m["peak_memory_gb"] is not None else "—"
        spread = f"{1e3 * m['step_time_p10_s']:.1f}-{1e3 * m['step_time_p90_s']:.1f} ms"
        lines.append(
            f"{name:16}{m['samples_per_second_per_gpu']:>14,.1f}{util:>8}{mem:>10}{100 * m['data_time_share']:>11.1f}%"
            f"{1e3 * m['step_time_median_s']:>8.1f} ms{spread:>18}"
        )
    kinds, cuda = report["step_breakdown_ms"], report["device"] == "cuda"
    step = report["phases"]["data excluded"]["step_time_median_s"] if cuda else None
    what = "kernel time" if cuda else "op time on the host"
    profiled = "one more step" if cuda else "three more steps"
    lines.append(f"{profiled}, data excluded, a step by {what}: {breakdown_line(kinds, step)}")
    return "\n".join(lines)


def batches(trainer: Trainer) -> list[Batch]:
    """One step's batches to repeat (data excluded), in training mode, from a stream closed after them."""
    trainer.engine.train()
    with fresh_stream(trainer) as stream:  # the loader puts the batches on the device
        return [trainer.fetch(stream) for _ in range(trainer.cfg.train.grad_accum)]


@contextlib.contextmanager
def fresh_stream(trainer: Trainer) -> Iterator[Iterator[Batch]]:
    """The loader's stream, opened now and closed after: a stream left open fills its queues while other work runs
    (a torch loader's workers, prefetch_factor batches each; DALI's prefetcher), and a data-included phase that
    began on that backlog would time batches decoded in the background, not what the data path keeps up with."""
    stream = iter(trainer.train_loader)
    try:
        yield stream
    finally:
        getattr(stream, "close", lambda: None)()  # a generator's close stops its DataLoader's workers


def run(trainer: Trainer) -> dict:
    """Both phases of ``train.benchmark`` steps on every rank (the steps are collective); rank 0 reports. Returns
    the report."""
    fixed = batches(trainer)
    cfg, device = trainer.cfg, trainer.world.device
    steps, warmup = cfg.train.benchmark, cfg.train.benchmark_warmup
    excluded = measure(trainer, itertools.cycle(fixed), steps, warmup)
    with fresh_stream(trainer) as stream:
        included = measure(trainer, stream, steps, warmup)
    report = {
        "model": cfg.model.name, "card": card(device), "device": device.type, "world": trainer.world.layout(),
        "world_size": trainer.world.world_size, "global_batch": trainer.global_batch, "steps": steps,
        "warmup": warmup, "precision": trainer.precision, "zero_stage": trainer.stage,
        "flops_per_sample": trainer.flops_per_sample, "peak_flops": trainer.peak_flops, "versions": versions(),
        "phases": {"data excluded": excluded, "data included": included},
    }  # fmt: skip
    # where a step's time goes (fastclip/profiling.py): one more step on the fixed batches, every rank (on a CPU,
    # whose one-step figures are noisy, three more)
    cuda = device.type == "cuda"
    profiled = profile_step(lambda: trainer.train_step(iter(fixed)), cuda=cuda, repeat=1 if cuda else 3)
    report["step_breakdown_ms"] = profiled.kinds
    report["step_top_ops"] = profiled.top
    if trainer.world.is_main:
        publish(report, table(report), cfg.log.dir)
    return report


def publish(report: dict, text: str, log_dir: str) -> None:
    """Rank 0's table (``text``) on the console and ``report`` in ``log_dir/benchmark.json``."""
    say(text)
    path = Path(log_dir) / "benchmark.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    say(f"benchmark: written to {path}")
