"""Measurement helpers shared by the benchmark suites: medians after warm-up, peak memory, machine facts.

Every case records fastclip's figure and the open_clip baseline's figure measured in the same run, and
their ratio (fastclip / baseline: below 1 is better for time and memory, above 1 for throughput).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    runs: int

    @property
    def spread(self) -> float:
        """(max - min) / median: how much to trust the median."""
        return (self.max_s - self.min_s) / self.median_s if self.median_s else float("nan")


def time_fn(fn: Callable[[], Any], *, repeats: int, warmup: int = 1, cuda: bool = False) -> Timing:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup``: perf_counter around the call and, on a
    GPU, a synchronize after it. pytest-benchmark's rounds (:func:`bench_time`) are timed the same way, so a
    fastclip figure and its baseline's come from one clock."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        _timed(fn, times, cuda)
    return _timing(times)


def bench_time(benchmark, fn: Callable[[], Any], *, repeats: int, warmup: int = 1, cuda: bool = False) -> Timing:
    """fastclip's timed body under pytest-benchmark's fixture (pedantic rounds after warm-up), so that
    ``--benchmark-autosave`` / ``--benchmark-compare`` track it from commit to commit; returns the same
    :class:`Timing` as :func:`time_fn`, on the same clock (perf_counter; on a GPU the body synchronizes). With
    ``--benchmark-disable`` (CI's quick run) the fixture runs its target once untimed: that target is then
    :func:`time_fn` over the body."""
    if benchmark.disabled:
        return bench_once(benchmark, lambda: time_fn(fn, repeats=repeats, warmup=warmup, cuda=cuda))

    if cuda:
        torch.cuda.synchronize()
    benchmark.pedantic(lambda: _timed(fn, [], cuda), rounds=repeats, warmup_rounds=warmup, iterations=1)
    stats = benchmark.stats.stats
    return Timing(stats.median, stats.min, stats.max, stats.rounds)


def _timed(fn: Callable[[], Any], into: list[float], cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    into.append(time.perf_counter() - t0)


def _timing(times: list[float]) -> Timing:
    return Timing(statistics.median(times), min(times), max(times), len(times))


def time_paired(
    ours: Callable[[], Any], theirs: Callable[[], Any], *, repeats: int, cuda: bool = False
) -> tuple[Timing, Timing]:
    """fastclip's body and the baseline's, alternating round by round (baseline, then fastclip), so that the drift
    of a shared machine reaches both alike. Returns (fastclip, baseline) timings."""
    mine: list[float] = []
    base: list[float] = []
    for _ in range(repeats):
        _timed(theirs, base, cuda)
        _timed(ours, mine, cuda)
    return _timing(mine), _timing(base)


def bench_paired(
    benchmark, ours: Callable[[], Any], theirs: Callable[[], Any], *, repeats: int, cuda: bool = False
) -> tuple[Timing, Timing]:
    """:func:`time_paired` with fastclip's rounds under pytest-benchmark's fixture (the baseline's run as each
    round's untimed setup, timed on the same clock)."""
    if benchmark.disabled:  # the fixture runs its target once, untimed: here, every round of both
        return bench_once(benchmark, lambda: time_paired(ours, theirs, repeats=repeats, cuda=cuda))
    mine: list[float] = []
    base: list[float] = []
    benchmark.pedantic(
        lambda: _timed(ours, mine, cuda), setup=lambda: _timed(theirs, base, cuda), rounds=repeats, iterations=1
    )
    return _timing(mine), _timing(base)


def wait_or_kill(procs: list[subprocess.Popen], timeout: float) -> None:
    """Wait for every process; if one outlives ``timeout`` (or the wait is interrupted), kill all still running."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def bench_once(benchmark, fn: Callable[[], Any]) -> Any:
    """``fn()`` as the fixture's one timed round (a whole multi-rank run, say), its result returned."""
    out = []
    benchmark.pedantic(lambda: out.append(fn()), rounds=1, iterations=1)  # disabled: run once, untimed
    return out[0]


def peak_extra_rss(code: str, *, timeout: float = 900) -> float:
    """Peak resident memory (bytes) that ``code``'s ``run()`` adds beyond what ``setup()`` left, in a fresh process.

    ``code`` defines ``setup() -> state`` and ``run(state)``. The kernel's peak-RSS counter is reset after setup
    (/proc/self/clear_refs), so imports and inputs are not counted.
    """
    driver = (
        code + "\nimport json, gc\n"
        "def _rss(key):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(key):\n"
        "            return int(line.split()[1]) * 1024\n"
        "state = setup(); gc.collect()\n"
        "base = _rss('VmRSS:')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "run(state)\n"
        "print(json.dumps({'extra': _rss('VmHWM:') - base}))\n"
    )
    out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe failed:\n{out.stderr[-3000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["extra"])


def machine() -> dict[str, Any]:
    import triton

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import open_clip

        info["open_clip"] = open_clip.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda_runtime"] = torch.version.cuda
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
            ).stdout.strip()
        except OSError:
            pass
    return info


@dataclass
class Result:
    suite: str  # loss, tokenizer, data, train_step, scaling
    case: str  # e.g. "fwd+bwd fp32 cpu"
    params: dict[str, Any]
    metric: str  # what the figures are: "seconds", "peak_extra_bytes", "samples_per_second", ...
    fastclip: float | None
    baseline: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""  # why a figure is missing, or what to know about it

    @property
    def ratio(self) -> float | None:
        if self.fastclip is None or self.baseline in (None, 0):
            return None
        return self.fastclip / self.baseline

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}
