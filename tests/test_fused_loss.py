"""The fused contrastive op (C++ on CPU, Triton under the interpreter and on CUDA) against float64 and torch.

Error rule (flash-attention's): against a float64 reference, a low-precision kernel may err at most 2x as
much as plain torch at the same dtype (3x for gradients); fp32 uses fixed tolerances.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from loss_inputs import features

from fastclip.loss import ClipLoss
from fastclip.ops import contrastive_lse, lse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _interpreter_broken() -> bool:
    """Triton's interpreter before 3.7 fails with numpy >= 2.4 (the GPU image pairs triton 3.6 with numpy 2.5)."""
    import numpy
    import triton

    version = lambda v: tuple(int(x) for x in v.split("+")[0].split(".")[:2])  # noqa: E731
    return version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4)


interpreter = pytest.mark.skipif(_interpreter_broken(), reason="Triton's interpreter < 3.7 fails with numpy >= 2.4")


def contrastive_lse_reference(q, k, scale, with_col):
    """The same values with the N x N logits materialized (float64 when given float64)."""
    logits = scale * q @ k.T
    row = torch.logsumexp(logits, dim=1)
    col = torch.logsumexp(logits, dim=0) if with_col else logits.new_empty(0)
    return row, col


def _grads(loss_fn, a, b, s, dtype, upstream=1.7):
    """loss and grads of loss_fn on fresh copies of (a, b, s) in ``dtype`` (s stays fp32 unless float64)."""
    a, b = a.detach().clone().to(dtype).requires_grad_(), b.detach().clone().to(dtype).requires_grad_()
    s = s.detach().clone().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    loss = loss_fn(a, b, s)
    (loss * upstream).backward()
    return [loss.detach().double(), a.grad.double(), b.grad.double(), s.grad.double()]


def _open_clip_loss(a, b, s):
    from open_clip.loss import ClipLoss as OpenClipLoss

    return OpenClipLoss()(a, b, s)


def _errors(got, ref):
    return [float((g - r).abs().max()) for g, r in zip(got, ref)]


def _assert_error_rule(ours, plain, floor):
    """Loss error at most 2x, gradient errors at most 3x those of plain torch at the same dtype (+ floor)."""
    assert ours[0] <= 2 * plain[0] + floor, (ours, plain)
    for mine, theirs in zip(ours[1:], plain[1:]):
        assert mine <= 3 * theirs + floor, (ours, plain)


def _floor(dtype, n, s) -> float:
    """Rounding of one gradient term, s/n in size: the bar where torch happens to be exact (N=1: loss 0, whose
    P - I cancels exactly in torch but is P and -I in two roundings in a fused kernel)."""
    return torch.finfo(dtype).eps * float(s) / n


NS = [1, 3, 127, 1000, 4096]
DS = [64, 500, 512, 768]


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
def test_cpp_fp32_matches_float64_and_open_clip(n, d):
    a, b, s = features(n, d, seed=n * 7 + d)
    ref = _grads(_open_clip_loss, a, b, s, torch.float64)
    ours = _grads(ClipLoss(backend="cpp"), a, b, s, torch.float32)
    theirs = _grads(_open_clip_loss, a, b, s, torch.float32)
    for got, want, other, name in zip(ours, ref, theirs, ("loss", "d_image", "d_text", "d_scale")):
        tol = 2e-5 * max(1.0, float(want.abs().max()))
        assert float((got - want).abs().max()) <= tol, name
        torch.testing.assert_close(got, other, rtol=1e-4, atol=1e-5, msg=name)


# bf16: torch's reference emulates bf16 matmuls on a CPU without AVX-512 (26x slower than fp32), so N=4096 runs at
# the short width only (6 s; the ViT-B/32 width took 50 s, a twentieth of the suite's CPU time on two cores); every
# width, 512 included, is covered up to N=1000, whose 1000 rows already span many of the kernel's row blocks
BF16_SIZES = [(n, d) for n in NS for d in DS if n < 4096 or d == 64]


@pytest.mark.parametrize("n, d", BF16_SIZES)
def test_cpp_bf16_error_at_most_torch_bf16_error(n, d):
    a, b, s = features(n, d, seed=n * 11 + d)
    ref = _grads(_open_clip_loss, a, b, s, torch.float64)
    ours = _errors(_grads(ClipLoss(backend="cpp"), a, b, s, torch.bfloat16), ref)
    torch_bf16 = _errors(_grads(_open_clip_loss, a, b, s, torch.bfloat16), ref)
    _assert_error_rule(ours, torch_bf16, _floor(torch.bfloat16, n, s))


INTERPRETER_SIZES = [(1, 64), (3, 33), (37, 40), (100, 64)]


def _interpreter_cases() -> dict:
    """Run in a TRITON_INTERPRET=1 subprocess (the flag is read at import; one process for every case, each start
    costs seconds): the Triton kernels' errors against float64 beside open_clip's at the same dtype, per size and
    dtype, and the guarded-rows case of :func:`test_triton_guarded_rows_and_columns_are_exact`."""
    cases = {}
    for n, d in INTERPRETER_SIZES:
        a, b, s = features(n, d, seed=5)
        ref = _grads(_open_clip_loss, a, b, s, torch.float64)
        for dtype in (torch.float32, torch.float16):
            ours = _errors(_grads(ClipLoss(backend="triton"), a, b, s, dtype), ref)
            plain = _errors(_grads(_open_clip_loss, a, b, s, dtype), ref)
            cases[f"{n}-{d}-{dtype}"] = [ours, plain]
    cases["guarded"] = _guarded_case()
    return cases


def _guarded_case() -> list:
    from fastclip.kernels.contrastive_lse import bound

    a, b, s = features(37, 40, seed=9)
    s = torch.tensor(100.0, dtype=torch.float64)
    a[5] = -F.normalize(b.mean(0), dim=0)  # every logit of row 5 near -s: 2^-(~190) below the bound
    b[7] = -F.normalize(a.mean(0), dim=0)  # and of column 7
    b[0] *= 3  # not normalized: B = 3 s
    logits = s * a @ b.T
    B = float(bound(a.float(), b.float(), s.float()))
    gaps = [B - float(torch.logsumexp(logits[5], 0)), B - float(torch.logsumexp(logits[:, 7], 0))]
    ref = _grads(_open_clip_loss, a, b, s, torch.float64)
    ours = _errors(_grads(ClipLoss(backend="triton"), a, b, s, torch.float32), ref)
    return [gaps, ours, [float(r.abs().max()) for r in ref]]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    code = "import json; from test_fused_loss import _interpreter_cases; print(json.dumps(_interpreter_cases()))"
    tests = str(Path(__file__).parent)  # the tests' own helpers (loss_inputs) import as pytest's rootdir puts them
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, d", INTERPRETER_SIZES)
def test_triton_interpreter(interpreted, n, d, dtype):
    """The Triton kernels on CPU tensors through TRITON_INTERPRET=1."""
    ours, plain = interpreted[f"{n}-{d}-{dtype}"]
    if dtype == torch.float32:
        assert max(ours) < 2e-5, ours
    else:
        _assert_error_rule(ours, plain, _floor(dtype, n, features(n, d, seed=5)[2]))


@interpreter
def test_triton_guarded_rows_and_columns_are_exact(interpreted):
    """Rows and columns whose logits all sit far below the bound B = s max|a| max|b| (sums of exp(L - B) under
    2^-60) take the kernels' exact path, forward and backward: here one text feature 3 long lifts B to 3 s, so most
    sums would underflow fp32 (below 2^-149) without the guard."""
    gaps, ours, scale = interpreted["guarded"]
    assert min(gaps) > 150 * 0.6931471805599453, gaps  # both sums below 2^-150: zero in fp32 without the guard
    assert all(e <= 2e-5 * max(1.0, m) for e, m in zip(ours, scale)), (ours, scale)


def test_lse_op_values_and_column_mode():
    a, b, s = features(300, 96, seed=1)
    for with_col in (True, False):
        row, col = contrastive_lse(a.float(), b[:200].float() if not with_col else b.float(), s.float(), with_col)
        ref_row, ref_col = contrastive_lse_reference(a, b[:200] if not with_col else b, s, with_col)
        torch.testing.assert_close(row.double(), ref_row, rtol=1e-6, atol=1e-5)
        assert col.numel() == (300 if with_col else 0)
        if with_col:
            torch.testing.assert_close(col.double(), ref_col, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", "cpp"])
def test_opcheck_and_compile(kernel):
    """Schema, fake (meta) kernel and autograd registration hold up, and torch.compile traces the op whole, for the
    device's kernel and a named one alike (ClipLoss(backend='cpp') runs through the same registered op)."""
    a, b, s = (t.float() for t in features(20, 16, seed=2))
    args = (a.requires_grad_(), b.requires_grad_(), s.requires_grad_(), True, kernel)
    torch.library.opcheck(contrastive_lse, args)

    def loss(x, y, t):
        return ClipLoss(backend=kernel)(x, y, t)

    # inductor too (for the device's kernel): its lowering of the op as a fallback kernel once failed on the op's
    # argument names, which aot_eager's tracing does not exercise
    for backend in ("aot_eager", "inductor") if kernel == "auto" else ("aot_eager",):
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(a, b, s), loss(a, b, s))
        ga = torch.autograd.grad(compiled(a, b, s), a)[0]
        torch.testing.assert_close(ga, torch.autograd.grad(loss(a, b, s), a)[0])


def test_the_ops_schemas_key_torch_compiles_cache():
    """A graph cached by a fastclip whose op had other argument names is not reused (it failed: 'Unknown keyword
    argument'): the schemas' hash is in torch.compile's cache key, once however often it is added."""
    from fastclip import ops

    ops._tag_compile_cache()
    tags = torch.compiler.config.cache_key_tag.split()
    assert len([t for t in tags if t.startswith("fastclip-ops-")]) == 1


def test_non_contiguous_inputs_give_the_same_numbers():
    a, b, s = features(50, 64, seed=3)
    wide = torch.cat([a, b], dim=1).float()
    ref = ClipLoss(backend="cpp")(a.float(), b.float(), s.float())
    got = ClipLoss(backend="cpp")(wide[:, :64], wide[:, 64:], s.float())
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("backend", ["cpp", "auto"])
def test_bad_input_is_a_clear_error(backend):
    a, b, s = (t.float() for t in features(8, 16, seed=4))
    with pytest.raises((ValueError, RuntimeError), match=r"\[N, D\]"):
        ClipLoss(backend=backend)(a, b[:, :8], s)
    with pytest.raises((ValueError, RuntimeError), match="N=0"):
        ClipLoss(backend=backend)(a[:0], b[:0], s)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        lse(a.double(), b.double(), s, True, backend)
    with pytest.raises(RuntimeError, match="share D"):
        lse(a, b[:, :8], s, True, backend)
    with pytest.raises(RuntimeError, match="one dtype"):
        lse(a, b.half(), s, True, backend)
    with pytest.raises(RuntimeError, match=r"q must be \[n, D\]"):
        lse(a[0], b, s, True, backend)
    with pytest.raises(ValueError, match="backend"):
        ClipLoss(backend="cuda-please")


def test_nan_and_inf_propagate():
    a, b, s = (t.float() for t in features(16, 32, seed=5))
    for bad in (float("nan"), float("inf")):
        x = a.clone()
        x[3, 7] = bad
        assert not torch.isfinite(ClipLoss(backend="cpp")(x, b, s))
        row, col = contrastive_lse(x, b, s, True)
        assert not torch.isfinite(row[3]) and not torch.isfinite(col).all()


@pytest.mark.gpu
@pytest.mark.parametrize("n, d", [(1, 64), (127, 500), (1000, 512), (4096, 768)])
def test_triton_cuda_bf16_error_rule(n, d):
    a, b, s = features(n, d, seed=n + d)
    a, b, s = a.cuda(), b.cuda(), s.cuda()
    ref = _grads(_open_clip_loss, a, b, s, torch.float64)

    def open_clip_autocast(x, y, t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _open_clip_loss(x, y, t)

    ours = _errors(_grads(ClipLoss(backend="auto"), a, b, s, torch.bfloat16), ref)
    plain = _errors(_grads(open_clip_autocast, a, b, s, torch.bfloat16), ref)
    _assert_error_rule(ours, plain, _floor(torch.bfloat16, n, s))
