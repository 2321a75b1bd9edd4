"""Where a step's time goes: one call profiled with torch.profiler and its time summed by kind of work (matmul,
attention, copies, optimizer, ...), for ``--train.benchmark`` (fastclip/benchmark.py) and the train-step benchmarks
(benchmarks/bench_train_step.py), which put fastclip's beside open_clip's to explain a ratio.

On a GPU the figures are kernel times: what the card was busy with. The step's time beyond their sum is the card
idling, waiting for Python, launches or a host sync. On a CPU they are each op's self time.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

# what a profiled CPU op or CUDA kernel is, by lower-case substrings of its name; the first kind that matches wins
OP_KINDS = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("matmul", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm", "conv")),
    # fastclip's ops on a CPU, its Triton kernels on a GPU (kernels/; their cuBLAS products count as matmul)
    ("loss", ("fastclip::", "_sums_kernel", "_finish_kernel", "_dlogits_kernel", "_sigmoid_tile_kernel")),
    ("collective", ("nccl", "gloo", "allreduce", "all_gather", "reduce_scatter", "broadcast")),
    ("optimizer", ("adam", "multi_tensor", "lerp", "addcdiv", "addcmul", "sqrt")),
    ("layer norm", ("layer_norm", "layernorm", "gammabeta")),
    ("reduction", ("reduce_kernel", "norm", "aten::sum", "aten::mean", "aten::max")),
    ("copy / cast", ("copy", "memcpy", "memset", "aten::cat", "fill", "clone")),
)


def op_kind(name: str) -> str:
    lower = name.lower()
    return next((kind for kind, marks in OP_KINDS if any(m in lower for m in marks)), "other")


@dataclass(frozen=True)
class StepProfile:
    """One profiled call: milliseconds by :data:`OP_KINDS`, largest first, and the ops (kernels on a GPU) that took
    the most, each ``{name, kind, calls, ms}``: a kind says where a gap is, the ops say which kernel makes it."""

    kinds: dict[str, float]
    top: list[dict]


def profile_step(fn: Callable[[], Any], *, cuda: bool = False, top: int = 15, repeat: int = 1) -> StepProfile:
    """``repeat`` calls of ``fn`` profiled, the figures per call (the profiler's own overhead is in none of them).
    ``cuda``: the kernels' device time, else each op's self time on the host (where one call's figures are noisy:
    repeat it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        # Kineto leaves CUPTI attached after a session unless told (pytorch/pytorch#144455), and kernels run 10-20%
        # slower for the rest of the process: a benchmark that profiles, then times, would time that
        os.environ.setdefault("TEARDOWN_CUPTI", "1")
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        for _ in range(repeat):
            fn()
        if cuda:
            torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        # on a GPU, record_function ranges (torch.optim's "Optimizer.step#AdamW.step", say) come back as device
        # events too, spanning the kernels they hold: counted, they would count those kernels twice
        if cuda and (event.device_type != DeviceType.CUDA or event.is_user_annotation):
            continue
        ms = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e3 / repeat
        kind = op_kind(event.key)
        kinds[kind] = kinds.get(kind, 0.0) + ms
        ops.append({"name": event.key[:160], "kind": kind, "calls": round(event.count / repeat), "ms": round(ms, 3)})
    ops.sort(key=lambda op: -op["ms"])
    return StepProfile({k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])}, ops[:top])


def breakdown_line(kinds: dict[str, float], step_s: float | None = None) -> str:
    """``matmul 210.3 ms (52%), attention 80.1 ms (20%), ...``; with ``step_s`` (a GPU's timed step), also how long
    the card idled in it."""
    busy = sum(kinds.values()) or 1.0
    parts = [f"{kind} {ms:.1f} ms ({100 * ms / busy:.0f}%)" for kind, ms in kinds.items()]
    if step_s is not None:
        parts.append(f"the card idle {max(0.0, 1e3 * step_s - busy):.1f} ms of {1e3 * step_s:.1f}")
    return ", ".join(parts)
