"""Contrastive loss, forward + backward: fastclip's fused op against open_clip's ClipLoss, same inputs, same run.

CPU: fp32 (the C++ kernel). GPU: bf16 (Triton) against open_clip under bf16 autocast, with TFLOP/s of the
8 N^2 D useful work (forward 2 N^2 D for both directions, backward 6 N^2 D) against the same card's measured
bf16 matmul peak. Time: median of runs after warm-up. Memory: peak beyond the inputs.
"""

from __future__ import annotations

import pytest
import torch

from harness import Result, bench_time, peak_extra_rss, time_fn

CPU_SIZES = {"full": [4096, 8192, 16384], "quick": [1024]}
GPU_SIZES = {"full": [8192, 32768, 65536], "quick": [4096]}
DIMS = [512, 768]

_INPUTS = """
import torch, torch.nn.functional as F
def inputs(n, d, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(n + d)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(a + 0.7 * torch.randn(n, d, generator=g), dim=-1)
    a, b = (t.to(device=device, dtype=dtype).requires_grad_() for t in (a, b))
    s = torch.tensor(14.0, device=device, requires_grad=True)
    return a, b, s
"""
exec(_INPUTS)  # defines inputs(); the memory probes run the same text in their own process


def _fastclip_step(a, b, s):
    from fastclip.loss import ClipLoss

    ClipLoss()(a, b, s).backward()


def _open_clip_step(a, b, s, autocast: bool = False):
    from open_clip.loss import ClipLoss

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = ClipLoss()(a, b, s)
    loss.backward()


def _size(sizes: dict[str, list[int]], quick: bool, index: int) -> int:
    """The N of parametrized case ``index`` in this mode; cases past the mode's list skip."""
    mode = sizes["quick" if quick else "full"]
    if index >= len(mode):
        pytest.skip("no such size in this mode")
    return mode[index]


def _clear_grads(*ts):
    for t in ts:
        t.grad = None


def _cpu_memory(which: str, n: int, d: int) -> float:
    step = (
        "from fastclip.loss import ClipLoss\ndef run(st): ClipLoss()(*st).backward()\n"
        if which == "fastclip"
        else "from open_clip.loss import ClipLoss\ndef run(st): ClipLoss()(*st).backward()\n"
    )
    # setup runs the step once on a tiny batch: lazy imports and op registration are not the loss's memory
    setup = (
        f"def setup():\n    run(inputs(8, {d}, torch.float32, 'cpu'))\n"
        f"    return inputs({n}, {d}, torch.float32, 'cpu')\n"
    )
    return peak_extra_rss(_INPUTS + step + setup)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("size_index", range(3))
def test_loss_cpu_fp32(benchmark, record, quick, size_index, d):
    n = _size(CPU_SIZES, quick, size_index)
    a, b, s = inputs(n, d, torch.float32, "cpu")  # noqa: F821 (defined by exec above)
    repeats = 1 if quick else 3

    def ours():
        _clear_grads(a, b, s)
        _fastclip_step(a, b, s)

    def theirs():
        _clear_grads(a, b, s)
        _open_clip_step(a, b, s)

    t_ours = bench_time(benchmark, ours, repeats=repeats)
    t_theirs = time_fn(theirs, repeats=repeats)
    params = {"N": n, "D": d, "dtype": "fp32", "device": "cpu", "threads": torch.get_num_threads()}
    record(Result("loss", "fwd+bwd time", params, "seconds", t_ours.median_s, t_theirs.median_s,
                  extra={"fastclip_spread": t_ours.spread, "baseline_spread": t_theirs.spread,
                         "runs": repeats}))  # fmt: skip
    m_ours, m_theirs = _cpu_memory("fastclip", n, d), _cpu_memory("open_clip", n, d)
    record(Result("loss", "fwd+bwd peak extra memory", params, "bytes", m_ours, m_theirs))
    benchmark.extra_info.update(params=params, time_ratio=t_ours.median_s / t_theirs.median_s,
                                memory_ratio=m_ours / m_theirs if m_theirs else None)  # fmt: skip


def _bf16_matmul_peak() -> float:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = time_fn(lambda: x @ y, repeats=20, warmup=5, cuda=True)
    return 2 * 8192**3 / t.median_s


@pytest.mark.gpu
def test_matmul_peak_gpu(record):
    record(
        Result(
            "loss", "bf16 matmul 8192^3 (card peak)", {"device": "cuda"}, "flop_per_second", _bf16_matmul_peak(), None
        )
    )


@pytest.mark.gpu
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("size_index", range(3))
def test_loss_gpu_bf16(benchmark, record, quick, size_index, d):
    n = _size(GPU_SIZES, quick, size_index)
    a, b, s = inputs(n, d, torch.bfloat16, "cuda")  # noqa: F821
    params = {"N": n, "D": d, "dtype": "bf16", "device": "cuda"}

    def ours():
        _clear_grads(a, b, s)
        _fastclip_step(a, b, s)

    def theirs():
        _clear_grads(a, b, s)
        _open_clip_step(a, b, s, autocast=True)

    def measure(fn, timer):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        try:
            t = timer(fn, repeats=3 if quick else 10, warmup=2, cuda=True)
        except torch.OutOfMemoryError:
            _clear_grads(a, b, s)
            torch.cuda.empty_cache()
            return None, None
        return t, torch.cuda.max_memory_allocated() - base

    t_ours, m_ours = measure(ours, lambda *a, **k: bench_time(benchmark, *a, **k))
    t_theirs, m_theirs = measure(theirs, time_fn)
    note = "" if t_theirs is not None else "open_clip ran out of GPU memory"
    work = 8 * n * n * d
    record(Result("loss", "fwd+bwd time", params, "seconds", t_ours.median_s if t_ours else None,
                  t_theirs.median_s if t_theirs else None, note=note,
                  extra={"fastclip_tflops": work / t_ours.median_s / 1e12 if t_ours else None,
                         "baseline_tflops": work / t_theirs.median_s / 1e12 if t_theirs else None}))  # fmt: skip
    record(Result("loss", "fwd+bwd peak extra memory", params, "bytes", m_ours, m_theirs, note=note))
