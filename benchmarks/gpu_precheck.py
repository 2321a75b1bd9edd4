"""The GPU suite's first stage (about a minute, no wheels): what the card and the fused losses do, each figure
printed and appended to OUT/precheck.jsonl the moment it exists, so a run cut short keeps everything before the cut.

    python benchmarks/gpu_precheck.py OUT [--tiles] [--quick]

Records, in order: versions and limits; the card's bf16 matmul rate (8192^3, the peak the losses are measured
against); the bf16 error rule (fastclip's fused loss and plain torch under autocast, both against float64, the rule
of tests/test_fused_loss.py), for ClipLoss and then SigLipLoss, and the exact path for guarded rows on the GPU (its
exp2 flushes subnormals); with --tiles, the forward and backward time of every candidate tile config at N = 32768,
D = 512; then forward-only and forward+backward time, TFLOP/s of the useful 8 N^2 D and extra memory at a few
(N, D), against plain torch's softmax loss under bf16 autocast (open_clip's ClipLoss computes exactly that;
open_clip itself is not on the GPU image, the pytest benchmarks compare against it when the wheels are carried);
last the same for SigLipLoss (TFLOP/s of 6 N^2 D, its one pass) against open_clip's SigLipLoss math in torch.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

OUT = sys.argv[1] if len(sys.argv) > 1 else "."
QUICK = "--quick" in sys.argv
SIZES = [(4096, 512)] if QUICK else [(8192, 512), (32768, 512), (32768, 768), (65536, 512), (65536, 768)]
SIGLIP_SIZES = [(4096, 512)] if QUICK else [(32768, 512), (32768, 768), (65536, 512), (65536, 768)]
STARTED = time.time()


ROWS: list[dict] = []


def emit(kind: str, **fields) -> None:
    """Print the row, append it to precheck.jsonl and rewrite precheck.json (the results format) at once."""
    row = {"kind": kind, "t": round(time.time() - STARTED, 1), **fields}
    print(json.dumps(row), flush=True)
    with open(os.path.join(OUT, "precheck.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    ROWS.append(row)
    if torch.cuda.is_available():
        from harness import machine

        info = {**machine(), "open_clip": "not used: the baseline is open_clip's ClipLoss math in torch"}
        with open(os.path.join(OUT, "precheck.json"), "w") as f:
            json.dump(to_results(ROWS, info), f, indent=1)


def to_results(rows: list[dict], info: dict) -> dict:
    """Precheck rows as a benchmarks/results file (harness.Result records), for report.py's tables in
    docs/benchmarks.md."""
    from harness import Result

    results = []
    for row in rows:
        if row["kind"] == "matmul_peak":
            results.append(Result("loss", "bf16 matmul 8192^3 (card peak)", {}, "flop_per_second",
                                  row["tflops"] * 1e12, None))  # fmt: skip
        prefix = "siglip " if row["kind"].startswith("siglip_") else ""  # the case names of bench_loss.py
        if row["kind"] in ("error_rule", "siglip_error_rule"):
            results.append(Result("loss", f"{prefix}bf16 error vs float64 (largest abs error of d_image)",
                                  {"N": row["n"], "D": row["d"]}, "abs_error", row["fused"][1], row["plain"][1],
                                  note="within the rule" if row["ok"] else "OUTSIDE the error rule"))  # fmt: skip
        if row["kind"] not in ("loss", "siglip_loss"):
            continue
        if "fwd_bwd_s" not in row["fused"] or "fwd_bwd_s" not in row["plain"]:
            continue
        params = {"N": row["n"], "D": row["d"], "dtype": "bf16"}
        ours, theirs = row["fused"], row["plain"]
        note = f"fastclip {ours['of_peak']:.0%} of the card's bf16 matmul rate"
        work = {"work": "6N²D"} if prefix else {}
        results.append(Result("loss", f"{prefix}fwd+bwd time", params, "seconds", ours["fwd_bwd_s"],
                              theirs["fwd_bwd_s"], note=note,
                              extra={**work, "fastclip_tflops": ours["tflops"],
                                     "baseline_tflops": theirs["tflops"]}))  # fmt: skip
        results.append(Result("loss", f"{prefix}fwd time (no grad)", params, "seconds", ours["fwd_s"], theirs["fwd_s"]))
        results.append(Result("loss", f"{prefix}fwd+bwd peak extra memory", params, "bytes", ours["extra_bytes"],
                              theirs["extra_bytes"]))  # fmt: skip
    date = next((r.get("date") for r in rows if r.get("date")), None) or time.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    return {"date": date, "quick": QUICK, "machine": info, "results": [r.to_json() for r in results],
            "note": "benchmarks/gpu_precheck.py: fastclip's fused losses against open_clip's ClipLoss computation "
                    "(logits under bf16 autocast, fp32 cross entropy) and its SigLipLoss computation (logits and "
                    "logsigmoid under bf16 autocast) in plain torch"}  # fmt: skip


def cuda_time(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn after warm-up, on the benchmarks' one clock (harness.time_fn)."""
    from harness import time_fn

    return time_fn(fn, repeats=repeats, warmup=warmup, cuda=True).median_s


def inputs(n: int, d: int, dtype=torch.bfloat16, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    a = F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=-1)
    b = F.normalize(a + 0.7 * torch.randn(n, d, device="cuda", generator=g), dim=-1)
    s = torch.tensor(14.0 + n % 7, device="cuda")
    return a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_(), s.requires_grad_()


def plain_loss(a, b, s):
    """open_clip's ClipLoss (one rank) under bf16 autocast, as it computes it: two logits products (per image, per
    text) in bf16, cross entropy in fp32. (The transposed first product instead of the second is slower.)"""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        labels = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(s * a @ b.T, labels) + F.cross_entropy(s * b @ a.T, labels)) / 2


def fused_loss(a, b, s):
    from fastclip.loss import ClipLoss

    return ClipLoss()(a, b, s)


def siglip_inputs(n: int, d: int, dtype=torch.bfloat16, seed: int = 0):
    """Features as inputs(), with a trained SigLIP's scale and bias (init 10 and -10: negatives near -10)."""
    a, b, _ = inputs(n, d, dtype, seed)
    s = torch.tensor(10.0, device=a.device, requires_grad=True)
    return a, b, s, torch.tensor(-10.0, device=a.device, requires_grad=True)


def plain_siglip(a, b, s, bias):
    """open_clip's SigLipLoss (one rank) under bf16 autocast, as it computes it: logits in bf16 with the bias added
    in place, labels 2 I - 1 in the features' dtype, -logsigmoid(labels * logits) summed over n."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = s * a @ b.T
        logits += bias
        labels = -torch.ones(a.shape[0], a.shape[0], device=a.device, dtype=a.dtype)
        labels = 2 * torch.eye(a.shape[0], device=a.device, dtype=a.dtype) + labels
        return -F.logsigmoid(labels * logits).sum() / a.shape[0]


def fused_siglip(a, b, s, bias):
    from fastclip.loss import SigLipLoss

    return SigLipLoss()(a, b, s, bias)


def versions() -> None:
    import triton

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()  # fmt: skip
    props = torch.cuda.get_device_properties(0)
    emit("versions", torch=torch.__version__, triton=triton.__version__, gpu=torch.cuda.get_device_name(0),
         smi=smi, sms=props.multi_processor_count, nofile=[soft, hard], python=sys.version.split()[0])  # fmt: skip


def matmul_peak() -> float:
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: x @ y, repeats=20, warmup=5)
    emit("matmul_peak", tflops=2 * 8192**3 / t / 1e12)
    return 2 * 8192**3 / t


def _grads(fn, a, b, s, dtype, bias=None):
    """[loss, d_image, d_text, d_scale(, d_bias)] of 1.7 fn(...) in float64, the features in ``dtype`` (scalars fp32
    unless float64, as a model's exp(logit_scale) and bias reach the loss)."""
    a, b = a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
    scalar = torch.float64 if dtype == torch.float64 else torch.float32
    scalars = [t.detach().to(scalar).requires_grad_() for t in ((s,) if bias is None else (s, bias))]
    loss = fn(a, b, *scalars)
    (1.7 * loss).backward()
    return [loss.detach().double(), a.grad.double(), b.grad.double(), *(t.grad.double() for t in scalars)]


def _within_rule(ours: list[float], plain: list[float], floor: float) -> bool:
    """tests/test_fused_loss.py's rule: loss error at most 2x plain torch's, gradients 3x (+ floor)."""
    return ours[0] <= 2 * plain[0] + floor and all(o <= 3 * p + floor for o, p in zip(ours[1:], plain[1:]))


def error_rule() -> None:
    def ref64(a, b, s):
        logits = s * a @ b.T
        labels = torch.arange(a.shape[0], device=a.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2

    for n, d in [(1, 64), (127, 500), (1000, 512), (4096, 768), (8192, 512)]:
        a, b, s = inputs(n, d, torch.float64, seed=n + d)
        ref = _grads(ref64, a, b, s, torch.float64)
        ours = [float((x - r).abs().max()) for x, r in zip(_grads(fused_loss, a, b, s, torch.bfloat16), ref)]
        plain = [float((x - r).abs().max()) for x, r in zip(_grads(plain_loss, a, b, s, torch.bfloat16), ref)]
        floor = torch.finfo(torch.bfloat16).eps * float(s) / n
        emit("error_rule", n=n, d=d, fused=ours, plain=plain, ok=_within_rule(ours, plain, floor))
    # guarded rows on the GPU: one text feature 3 long lifts the bound to 3 s; fp32 with exact (ieee) products
    a, b, s = inputs(333, 512, torch.float64, seed=3)
    b.data[0] *= 3
    s = torch.tensor(100.0, device="cuda", dtype=torch.float64)
    ref = _grads(ref64, a, b, s, torch.float64)
    torch.set_float32_matmul_precision("highest")
    ours = [float((x - r).abs().max()) for x, r in zip(_grads(fused_loss, a, b, s, torch.float32), ref)]
    torch.set_float32_matmul_precision("high")
    emit("guarded_fp32", errors=ours, ok=all(e <= 2e-5 * max(1.0, float(r.abs().max())) for e, r in zip(ours, ref)))


def siglip_error_rule() -> None:
    """The rule for SigLipLoss (tests/test_siglip.py's on the CPU): the Triton kernel and open_clip's math under
    autocast against float64; errors listed as loss, d_image, d_text, d_scale, d_bias."""

    def ref64(a, b, s, bias):
        logits = s * a @ b.T + bias
        labels = 2 * torch.eye(a.shape[0], device=a.device, dtype=a.dtype) - 1
        return -F.logsigmoid(labels * logits).sum() / a.shape[0]

    for n, d in [(1, 64), (127, 500), (1000, 512), (4096, 768), (8192, 512)]:
        a, b, s, bias = siglip_inputs(n, d, torch.float64, seed=n + d)
        ref = _grads(ref64, a, b, s, torch.float64, bias)
        ours = [float((x - r).abs().max()) for x, r in zip(_grads(fused_siglip, a, b, s, torch.bfloat16, bias), ref)]
        plain = [float((x - r).abs().max()) for x, r in zip(_grads(plain_siglip, a, b, s, torch.bfloat16, bias), ref)]
        floor = torch.finfo(torch.bfloat16).eps * float(s.detach()) / n
        emit("siglip_error_rule", n=n, d=d, fused=ours, plain=plain, ok=_within_rule(ours, plain, floor))


def _time_op(n: int, d: int, with_backward: bool) -> float:
    a, b, s = inputs(n, d)

    def step():
        a.grad = b.grad = s.grad = None
        loss = fused_loss(a, b, s)
        if with_backward:
            loss.backward()

    return cuda_time(step, repeats=5)


def tiles() -> None:
    from fastclip.kernels import contrastive_lse as K

    n, d = 32768, 512
    for kind in ("fwd", "bwd"):
        keep = K.CONFIGS[kind]["cuda16"]
        for cfg in K.CANDIDATES:
            K.CONFIGS[kind]["cuda16"] = cfg
            try:
                t_f = _time_op(n, d, False)
                t_fb = _time_op(n, d, True)
                emit("tile", which=kind, cfg=cfg, n=n, d=d, fwd_s=t_f, fwd_bwd_s=t_fb)
            except Exception as e:  # a config the card rejects (shared memory, resources) is a finding, not an end
                emit("tile", which=kind, cfg=cfg, error=repr(e)[:300])
            finally:
                K.CONFIGS[kind]["cuda16"] = keep
            torch.cuda.empty_cache()


def _clear(args) -> None:
    for t in args:
        t.grad = None


def _extra_memory(fn, args) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(*args).backward()
    torch.cuda.synchronize()
    _clear(args)
    return torch.cuda.max_memory_allocated() - base


def _measure(fn, args: tuple, peak: float, flops: int) -> dict:
    """Forward-only and forward+backward time of fn(*args), ``flops`` per forward+backward, extra memory. The
    forward alone is timed without grad (the loss as eval computes it): under autograd the fused SigLIP forward
    computes its gradient in the same pass, which would make "forward" mean different work on the two sides."""

    def both():
        _clear(args)
        fn(*args).backward()

    def forward():
        with torch.no_grad():
            fn(*args)

    try:
        fwd = cuda_time(forward, repeats=5)
        t = cuda_time(both, repeats=5)
        return {"fwd_s": fwd, "fwd_bwd_s": t, "tflops": flops / t / 1e12, "of_peak": flops / t / peak,
                "extra_bytes": _extra_memory(fn, args)}  # fmt: skip
    except (torch.OutOfMemoryError, RuntimeError) as e:  # CUDA OOM may arrive as either
        return {"error": repr(e)[:200]}
    finally:
        _clear(args)
        torch.cuda.empty_cache()


def _compare(kind: str, fused, plain, args: tuple, peak: float, flops: int) -> None:
    """One row: the fused loss and its plain torch baseline on the same inputs, their ratios."""
    n, d = args[0].shape
    row = {"n": n, "d": d, "fused": _measure(fused, args, peak, flops), "plain": _measure(plain, args, peak, flops)}
    if "fwd_bwd_s" in row["fused"] and "fwd_bwd_s" in row["plain"]:
        row["time_ratio"] = row["fused"]["fwd_bwd_s"] / row["plain"]["fwd_bwd_s"]
        row["memory_ratio"] = row["fused"]["extra_bytes"] / row["plain"]["extra_bytes"]
    emit(kind, **row)


def loss_timings(peak: float) -> None:
    for n, d in SIZES:
        _compare("loss", fused_loss, plain_loss, inputs(n, d), peak, 8 * n * n * d)
        torch.cuda.empty_cache()


def siglip_timings(peak: float) -> None:
    """SigLipLoss: 6 N^2 D per forward + backward (the fused forward computes the gradient in the same pass;
    open_clip's forward and backward make the same 3 GEMMs); forward-only without grad on both sides."""
    for n, d in SIGLIP_SIZES:
        _compare("siglip_loss", fused_siglip, plain_siglip, siglip_inputs(n, d), peak, 6 * n * n * d)
        torch.cuda.empty_cache()


def breakdown() -> None:
    """Where the fused backward's time goes at N = 32768, D = 512: the dL kernel against its two cuBLAS GEMMs."""
    from fastclip.kernels import contrastive_lse as K

    n, d = 32768, 512
    a, b, s = inputs(n, d)
    q, k, sc = a.detach(), b.detach(), s.detach()
    row, col = K.lse_forward(q, k, sc, True)
    g = torch.full((n,), 1 / (2 * n), device="cuda")
    t_fwd = cuda_time(lambda: K.lse_forward(q, k, sc, True), repeats=5)
    t_bwd = cuda_time(lambda: K.lse_backward(q, k, sc, row, col, g, g), repeats=5)
    chunk = K.chunk_rows(n, n, K.CONFIGS["bwd"]["cuda16"][0], 2)
    dl = torch.randn(chunk, n, device="cuda", dtype=torch.bfloat16)
    dk = torch.zeros(n, d, device="cuda")

    def gemms():
        for r0 in range(0, n, chunk):
            c = min(chunk, n - r0)
            torch.mm(dl[:c], k)
            K._accumulate(dk, dl[:c].T, q[r0 : r0 + c])

    t_gemm = cuda_time(gemms, repeats=5)
    try:
        torch.addmm(dk, dl.T, q[: dl.shape[0]], out_dtype=torch.float32)
        out_dtype = True
    except (RuntimeError, TypeError) as e:
        out_dtype = repr(e)[:200]
    emit("breakdown", n=n, d=d, fwd_s=t_fwd, bwd_s=t_bwd, bwd_gemms_s=t_gemm, dl_kernel_s=t_bwd - t_gemm,
         chunk=chunk, addmm_out_dtype=out_dtype,
         fwd_tflops=2 * n * n * d / t_fwd / 1e12, bwd_tflops=6 * n * n * d / t_bwd / 1e12)  # fmt: skip


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    if not torch.cuda.is_available():
        emit("versions", torch=torch.__version__, cuda=False, note="no CUDA device: the precheck needs one")
        return
    versions()
    peak = matmul_peak()
    error_rule()
    siglip_error_rule()
    if "--tiles" in sys.argv:
        tiles()
    breakdown()
    loss_timings(peak)
    siglip_timings(peak)
    emit("done")


if __name__ == "__main__":
    main()
