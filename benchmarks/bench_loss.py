"""Contrastive losses, forward + backward: fastclip's fused ops against open_clip's ClipLoss and SigLipLoss, same
inputs, same run.

CPU: fp32 (the C++ kernels). GPU: bf16 (Triton) against open_clip under bf16 autocast, with TFLOP/s of the useful
work against the same card's measured bf16 matmul peak: ClipLoss 8 N^2 D (forward 2 N^2 D for both directions,
backward 6 N^2 D), SigLipLoss 6 N^2 D (its one pass: the logits GEMM and the gradient's two; open_clip's forward
and backward do the same three). Time: median of runs after warm-up. Memory: peak beyond the inputs.
"""

from __future__ import annotations

import pytest
import torch

from harness import Result, bench_time, peak_extra_rss, time_fn

CPU_SIZES = {"full": [4096, 8192, 16384], "quick": [1024]}
GPU_SIZES = {"full": [8192, 32768, 65536], "quick": [4096]}
DIMS = [512, 768]
SIGLIP_GPU_SIZES = {"full": [32768, 65536], "quick": [4096]}
# one D in quick mode: each CPU case's two memory probes start a Python each (open_clip's import alone is ~3 s on
# 2 cores), and make test runs the quick suite
CPU_DIMS = {"full": DIMS, "quick": [512]}

_INPUTS = """
import torch, torch.nn.functional as F
def inputs(n, d, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(n + d)
    a = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    b = F.normalize(a + 0.7 * torch.randn(n, d, generator=g), dim=-1)
    a, b = (t.to(device=device, dtype=dtype).requires_grad_() for t in (a, b))
    s = torch.tensor(14.0, device=device, requires_grad=True)
    return a, b, s
def siglip_inputs(n, d, dtype, device):
    # a trained SigLIP's scale and bias (init 10 and -10): the negatives' logits sit near -10
    a, b, _ = inputs(n, d, dtype, device)
    s = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    return a, b, s, bias
"""
exec(_INPUTS)  # defines inputs() and siglip_inputs(); the memory probes run the same text in their own process


def _fastclip_step(a, b, s):
    from fastclip.loss import ClipLoss

    ClipLoss()(a, b, s).backward()


def _open_clip_step(a, b, s, autocast: bool = False):
    from open_clip.loss import ClipLoss

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = ClipLoss()(a, b, s)
    loss.backward()


def _fastclip_siglip_step(a, b, s, bias):
    from fastclip.loss import SigLipLoss

    SigLipLoss()(a, b, s, bias).backward()


def _open_clip_siglip_step(a, b, s, bias, autocast: bool = False):
    from open_clip.loss import SigLipLoss

    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = SigLipLoss()(a, b, s, bias)
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


def _cpu_memory(which: str, n: int, d: int, loss: str = "ClipLoss") -> float:
    """Peak extra RSS of one forward + backward of ``loss`` (ClipLoss or SigLipLoss) from fastclip or open_clip."""
    module = "fastclip.loss" if which == "fastclip" else "open_clip.loss"
    step = f"from {module} import {loss}\ndef run(st): {loss}()(*st).backward()\n"
    make = "siglip_inputs" if loss == "SigLipLoss" else "inputs"
    # setup runs the step once on a tiny batch: lazy imports and op registration are not the loss's memory
    setup = (
        f"def setup():\n    run({make}(8, {d}, torch.float32, 'cpu'))\n"
        f"    return {make}({n}, {d}, torch.float32, 'cpu')\n"
    )
    return peak_extra_rss(_INPUTS + step + setup)


def _cpu_case(benchmark, record, quick, n: int, d: int, tensors: tuple, ours_step, theirs_step, loss: str) -> None:
    """Time (fastclip's and open_clip's step on the same ``tensors``) and peak extra memory (each in a process of
    its own) of one CPU case of ``loss`` (ClipLoss or SigLipLoss), recorded beside each other."""
    repeats = 1 if quick else 3

    def ours():
        _clear_grads(*tensors)
        ours_step(*tensors)

    def theirs():
        _clear_grads(*tensors)
        theirs_step(*tensors)

    prefix = "siglip " if loss == "SigLipLoss" else ""  # the case names of the results files
    t_ours = bench_time(benchmark, ours, repeats=repeats)
    t_theirs = time_fn(theirs, repeats=repeats)
    params = {"N": n, "D": d, "dtype": "fp32", "device": "cpu", "threads": torch.get_num_threads()}
    record(Result("loss", f"{prefix}fwd+bwd time", params, "seconds", t_ours.median_s, t_theirs.median_s,
                  extra={"fastclip_spread": t_ours.spread, "baseline_spread": t_theirs.spread,
                         "runs": repeats}))  # fmt: skip
    m_ours, m_theirs = _cpu_memory("fastclip", n, d, loss), _cpu_memory("open_clip", n, d, loss)
    record(Result("loss", f"{prefix}fwd+bwd peak extra memory", params, "bytes", m_ours, m_theirs))
    benchmark.extra_info.update(params=params, time_ratio=t_ours.median_s / t_theirs.median_s,
                                memory_ratio=m_ours / m_theirs if m_theirs else None)  # fmt: skip


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("size_index", range(3))
def test_loss_cpu_fp32(benchmark, record, quick, size_index, d):
    n = _size(CPU_SIZES, quick, size_index)
    if d not in CPU_DIMS["quick" if quick else "full"]:
        pytest.skip("no such D in this mode")
    tensors = inputs(n, d, torch.float32, "cpu")  # noqa: F821 (defined by exec above)
    _cpu_case(benchmark, record, quick, n, d, tensors, _fastclip_step, _open_clip_step, "ClipLoss")


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("size_index", range(3))
def test_siglip_loss_cpu_fp32(benchmark, record, quick, size_index, d):
    n = _size(CPU_SIZES, quick, size_index)
    if d not in CPU_DIMS["quick" if quick else "full"]:
        pytest.skip("no such D in this mode")
    tensors = siglip_inputs(n, d, torch.float32, "cpu")  # noqa: F821 (defined by exec above)
    _cpu_case(benchmark, record, quick, n, d, tensors, _fastclip_siglip_step, _open_clip_siglip_step, "SigLipLoss")


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


def _gpu_measure(fn, timer, repeats: int, tensors: tuple):
    """(Timing, peak extra bytes) of ``fn`` on the GPU, or (None, None) when it runs out of memory."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        t = timer(fn, repeats=repeats, warmup=2, cuda=True)
    except torch.OutOfMemoryError:
        _clear_grads(*tensors)
        torch.cuda.empty_cache()
        return None, None
    return t, torch.cuda.max_memory_allocated() - base


@pytest.fixture(scope="module")
def matmul_peak() -> float:
    """The card's bf16 matmul rate, measured once for the module's cases that report a fraction of it."""
    return _bf16_matmul_peak()


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

    repeats = 3 if quick else 10
    t_ours, m_ours = _gpu_measure(ours, lambda *a, **k: bench_time(benchmark, *a, **k), repeats, (a, b, s))
    t_theirs, m_theirs = _gpu_measure(theirs, time_fn, repeats, (a, b, s))
    note = "" if t_theirs is not None else "open_clip ran out of GPU memory"
    work = 8 * n * n * d
    record(Result("loss", "fwd+bwd time", params, "seconds", t_ours.median_s if t_ours else None,
                  t_theirs.median_s if t_theirs else None, note=note,
                  extra={"fastclip_tflops": work / t_ours.median_s / 1e12 if t_ours else None,
                         "baseline_tflops": work / t_theirs.median_s / 1e12 if t_theirs else None}))  # fmt: skip
    record(Result("loss", "fwd+bwd peak extra memory", params, "bytes", m_ours, m_theirs, note=note))


@pytest.mark.gpu
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("size_index", range(2))
def test_siglip_loss_gpu_bf16(benchmark, record, quick, matmul_peak, size_index, d):
    n = _size(SIGLIP_GPU_SIZES, quick, size_index)
    a, b, s, bias = siglip_inputs(n, d, torch.bfloat16, "cuda")  # noqa: F821
    params = {"N": n, "D": d, "dtype": "bf16", "device": "cuda"}

    def ours():
        _clear_grads(a, b, s, bias)
        _fastclip_siglip_step(a, b, s, bias)

    def theirs():
        _clear_grads(a, b, s, bias)
        _open_clip_siglip_step(a, b, s, bias, autocast=True)

    repeats = 3 if quick else 10
    t_ours, m_ours = _gpu_measure(ours, lambda *a, **k: bench_time(benchmark, *a, **k), repeats, (a, b, s, bias))
    t_theirs, m_theirs = _gpu_measure(theirs, time_fn, repeats, (a, b, s, bias))
    note = "" if t_theirs is not None else "open_clip ran out of GPU memory"
    work = 6 * n * n * d  # fastclip's one pass: logits and the gradient's two GEMMs (open_clip's three alike)
    rate_ours = work / t_ours.median_s if t_ours else None
    rate_theirs = work / t_theirs.median_s if t_theirs else None
    record(Result("loss", "siglip fwd+bwd time", params, "seconds", t_ours.median_s if t_ours else None,
                  t_theirs.median_s if t_theirs else None, note=note,
                  extra={"work": "6N²D", "fastclip_tflops": rate_ours / 1e12 if rate_ours else None,
                         "baseline_tflops": rate_theirs / 1e12 if rate_theirs else None,
                         "fastclip_of_peak": rate_ours / matmul_peak if rate_ours else None,
                         "baseline_of_peak": rate_theirs / matmul_peak if rate_theirs else None,
                         "matmul_peak_flops": matmul_peak}))  # fmt: skip
    record(Result("loss", "siglip fwd+bwd peak extra memory", params, "bytes", m_ours, m_theirs, note=note))


DIST_SIZES = {"full": [2048], "quick": []}  # rows per rank; not in quick mode (two launches of W processes each)


def _dist_worker(rank, world, port, n, d, repeats, out):
    """Rank ``rank``: fwd+bwd of SigLipLoss with each dist_impl and of open_clip's default ('bidir'), each timed
    from a barrier to a barrier (the slowest rank's time); rank 0 sends the medians."""
    import os
    import time

    import torch.distributed as dist
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    from fastclip.loss import SigLipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    a, b, s, bias = siglip_inputs(n, d, torch.float32, "cpu")  # noqa: F821 (defined by exec above)
    losses = {impl: SigLipLoss(rank=rank, world_size=world, dist_impl=impl) for impl in ("gather", "shift", "bidir")}
    losses["open_clip bidir"] = OpenSigLipLoss(rank=rank, world_size=world, dist_impl="bidir")
    medians = {}
    for name, loss_fn in losses.items():
        times = []
        for _ in range(repeats + 1):  # the first is warm-up
            _clear_grads(a, b, s, bias)
            dist.barrier()
            start = time.perf_counter()
            loss_fn(a, b, s, bias).backward()
            dist.barrier()
            times.append(time.perf_counter() - start)
        medians[name] = sorted(times[1:])[len(times[1:]) // 2]
    if rank == 0:
        out.put(medians)
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_siglip_dist_impl_cpu(record, quick, world):
    """How texts reach the other ranks (gloo, fp32, n rows a rank): one all-gather and one fused call ('gather')
    against W - 1 neighbour exchanges with a fused call per block ('shift', 'bidir'), beside open_clip's 'bidir'."""
    import socket

    import torch.multiprocessing as mp

    sizes = DIST_SIZES["quick" if quick else "full"]
    if not sizes:
        pytest.skip("full mode only")
    n, d = sizes[0], 512
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, world, port, n, d, 3, out)) for r in range(world)]
    for p in procs:
        p.start()
    medians = out.get(timeout=900)
    for p in procs:
        p.join(timeout=120)
    params = {"n_per_rank": n, "D": d, "ranks": world, "dtype": "fp32", "device": "cpu", "backend": "gloo"}
    for impl in ("gather", "shift", "bidir"):
        record(Result("loss", f"siglip {world} ranks dist_impl {impl} fwd+bwd time", params, "seconds",
                      medians[impl], medians["open_clip bidir"],
                      note="baseline: open_clip's SigLipLoss, dist_impl bidir (its default)"))  # fmt: skip
