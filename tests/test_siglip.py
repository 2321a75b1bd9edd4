"""SigLipLoss and the fused sigmoid op against open_clip's SigLipLoss and float64, on 1, 2 and 4 ranks.

Error rule as for ClipLoss (tests/test_fused_loss.py): against a float64 reference, a low-precision loss may err at
most 2x as much as plain torch (open_clip) at the same dtype, 3x for gradients; fp32 uses fixed tolerances.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from loss_inputs import features
from test_fused_loss import _assert_error_rule, _errors, interpreter
from test_loss import _free_port

from fastclip.loss import SigLipLoss, sigmoid_loss_local
from fastclip.model import loss_kind
from fastclip.ops import sigmoid_loss_op, sigmoid_pair_loss


def _grads(loss_fn, a, b, s, bias, dtype, upstream=1.3):
    """loss and grads (image, text, scale, bias) of loss_fn on fresh copies in ``dtype`` (s, bias fp32 unless
    float64, as a model's exp(logit_scale) and bias reach the loss)."""
    a, b = (t.detach().clone().to(dtype).requires_grad_() for t in (a, b))
    scalar = torch.float64 if dtype == torch.float64 else torch.float32
    s, bias = (t.detach().clone().to(scalar).requires_grad_() for t in (s, bias))
    loss = loss_fn(a, b, s, bias)
    (loss * upstream).backward()
    return [loss.detach().double(), a.grad.double(), b.grad.double(), s.grad.double(), bias.grad.double()]


def _open_clip(a, b, s, bias):
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    return OpenSigLipLoss()(a, b, s, bias)


def _floor(dtype, n, s):
    return torch.finfo(dtype).eps * float(s) / n


HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")


@pytest.mark.parametrize("n, d", [(1, 64), (3, 500), (127, 512), (1000, 768), (1500, 33)])
def test_cpp_matches_float64_and_open_clip_fp32_and_bf16(n, d):
    a, b, s, bias = features(n, d, seed=n + d, bias=(-12.0, -5.0))
    ref = _grads(_open_clip, a, b, s, bias, torch.float64)
    ours = _grads(SigLipLoss(backend="cpp"), a, b, s, bias, torch.float32)
    theirs = _grads(_open_clip, a, b, s, bias, torch.float32)
    for got, want, other, name in zip(ours, ref, theirs, NAMES):
        assert float((got - want).abs().max()) <= 2e-5 * max(1.0, float(want.abs().max())), name
        torch.testing.assert_close(got, other, rtol=1e-4, atol=1e-5, msg=name)
    mine = _errors(_grads(SigLipLoss(backend="cpp"), a, b, s, bias, torch.bfloat16), ref)
    plain = _errors(_grads(_open_clip, a, b, s, bias, torch.bfloat16), ref)
    _assert_error_rule(mine, plain, _floor(torch.bfloat16, n, s))


def test_torch_backend_is_the_reference():
    """Plain logits in fp32 (the reference backend): open_clip's fp32 numbers."""
    a, b, s, bias = features(40, 24, seed=5, bias=(-12.0, -5.0))
    ref = _grads(_open_clip, a, b, s, bias, torch.float32)
    for got, want in zip(_grads(SigLipLoss(backend="torch"), a, b, s, bias, torch.float32), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _interpreter_cases():
    """Run in a TRITON_INTERPRET=1 subprocess (the flag is read at import): the Triton kernel's errors against
    float64 next to open_clip's at the same dtype, and its loss with offset positives and none, against the C++."""
    cases = []
    for n, d in ((1, 64), (3, 33), (37, 40), (100, 64)):
        a, b, s, bias = features(n, d, seed=n * 3 + d, bias=(-12.0, -5.0))
        ref = _grads(_open_clip, a, b, s, bias, torch.float64)
        for dtype in (torch.float32, torch.float16):
            ours = _errors(_grads(SigLipLoss(backend="triton"), a, b, s, bias, dtype), ref)
            plain = _errors(_grads(_open_clip, a, b, s, bias, dtype), ref)
            cases.append([n, d, str(dtype), ours, plain, [float(r.abs().max()) for r in ref]])
    a, b, s, bias = (t.float() for t in features(48, 40, seed=9, bias=(-12.0, -5.0)))
    from fastclip.kernels import contrastive_lse

    contrastive_lse.DL_BUFFER_BYTES = 16 * 48 * 4  # dz in chunks of 16 rows: rows 16-47 go through row0 > 0
    offsets = []
    for rows, offset in ((16, 16), (16, 48), (48, 0)):  # a rank's rows against gathered texts; another rank's; all
        q = a[:rows]
        triton_out, cpp_out = (sigmoid_loss_op(q, b, s, bias, offset, True, k) for k in ("triton", "cpp"))
        grad_errors = [float((t - c).abs().max() / c.abs().max()) for t, c in zip(triton_out[1:], cpp_out[1:])]
        want = float(sigmoid_loss_local(q, b, s, bias, offset=offset))
        offsets.append([float(triton_out[0]), float(cpp_out[0]), want, grad_errors])
    return cases, offsets


@interpreter
def test_triton_interpreter():
    code = "import json, test_siglip; print(json.dumps(test_siglip._interpreter_cases()))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([HERE, os.path.dirname(HERE)])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    cases, offsets = json.loads(out.stdout.strip().splitlines()[-1])
    for n, d, dtype, ours, plain, scale in cases:
        if dtype == "torch.float32":
            assert all(e <= 2e-5 * max(1.0, m) for e, m in zip(ours, scale)), (n, d, ours)
        else:
            _assert_error_rule(ours, plain, _floor(torch.float16, n, 20.0))
    for triton_loss, cpp_loss, want, grad_errors in offsets:
        assert triton_loss == pytest.approx(want, rel=1e-5) and cpp_loss == pytest.approx(want, rel=1e-5)
        assert max(grad_errors) < 1e-5, grad_errors  # dq, dk, (ds, db) of the Triton kernel against the C++


def test_opcheck_compile_and_no_grad():
    a, b, s, bias = (t.float() for t in features(20, 16, seed=2, bias=(-12.0, -5.0)))
    args = (a.requires_grad_(), b.requires_grad_(), s.requires_grad_(), bias.requires_grad_())
    torch.library.opcheck(sigmoid_loss_op, (*args, 0, True, "auto"))

    def loss(x, y, t, c):
        return SigLipLoss()(x, y, t, c)

    for backend in ("aot_eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(loss, backend=backend, fullgraph=True)
        torch.testing.assert_close(compiled(*args), loss(*args))
        grads = torch.autograd.grad(compiled(*args), args)
        for got, want in zip(grads, torch.autograd.grad(loss(*args), args)):
            torch.testing.assert_close(got, want)
    import fastclip.ops

    seen, op = [], fastclip.ops.sigmoid_loss_op

    def spy(*call):
        seen.append(call[5])  # with_grad
        return op(*call)

    fastclip.ops.sigmoid_loss_op = spy
    try:
        with torch.no_grad():  # eval: the loss alone, no gradient pass, the same value
            torch.testing.assert_close(loss(*args), loss(*args).detach(), rtol=0, atol=0)
            eval_value = loss(*args)
        train_value = loss(*args)
    finally:
        fastclip.ops.sigmoid_loss_op = op
    assert seen == [False, False, False, True]
    torch.testing.assert_close(eval_value, train_value.detach(), rtol=1e-6, atol=0)
    raw = sigmoid_loss_op(a.detach(), b.detach(), s.detach(), bias.detach().requires_grad_(), 0, False)
    with pytest.raises(RuntimeError, match="with_grad=False"):
        raw[0].backward()
    with pytest.raises(RuntimeError, match="second-order"):  # the saved gradient is a constant: refuse, not zeros
        torch.autograd.grad(loss(*args), args[0], create_graph=True)


def test_bad_input_and_config_are_clear_errors():
    a, b, s, bias = (t.float() for t in features(8, 16, seed=4, bias=(-12.0, -5.0)))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        SigLipLoss()(a, b[:, :8], s, bias)
    with pytest.raises(ValueError, match="N >= 1"):
        SigLipLoss()(a[:0], b[:0], s, bias)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        sigmoid_pair_loss(a.double(), b.double(), s, bias, 0)
    with pytest.raises(ValueError, match="bias must hold one value"):
        sigmoid_pair_loss(a, b, s, torch.zeros(2), 0)
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    import torch.distributed as dist

    # another test in this process may have left a one-rank group: either way, not the 2 ranks it was told of
    with pytest.raises(
        RuntimeError, match="initialized torch.distributed" if not dist.is_initialized() else "group of 1"
    ):
        SigLipLoss(rank=0, world_size=2)(a, b, s, bias)
    from fastclip.config import LossConfig
    from fastclip.errors import ConfigError

    assert loss_kind(LossConfig(), "ViT-B-16-SigLIP") == "siglip"
    assert loss_kind(LossConfig(), "fastclip-tiny") == "clip"
    assert loss_kind(LossConfig(kind="siglip"), "fastclip-tiny") == "siglip"
    with pytest.raises(ConfigError, match="loss.kind clip.*SigLIP architecture"):
        loss_kind(LossConfig(kind="clip"), "ViT-B-16-SigLIP")


def test_nan_propagates_and_python_floats_are_taken():
    a, b, s, bias = (t.float() for t in features(16, 32, seed=5, bias=(-12.0, -5.0)))
    want = SigLipLoss()(a, b, s, bias)
    torch.testing.assert_close(SigLipLoss()(a, b, float(s), float(bias)), want)  # as open_clip takes them
    from fastclip.loss import ClipLoss

    torch.testing.assert_close(ClipLoss()(a, b, float(s)), ClipLoss()(a, b, s))
    a[3, 7] = float("nan")
    a.requires_grad_()
    loss = SigLipLoss(backend="cpp")(a, b, s, bias)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(a.grad[3]).all()


# ---- several ranks ----------------------------------------------------------------------------------------------


def _rank_worker(rank, world, port, a, b, s, bias, out):
    """Rank ``rank``'s loss and gradients from open_clip (its default 'bidir') and from fastclip's SigLipLoss with
    each dist_impl and backend, fp32 and bf16, as numpy arrays (they travel by value)."""
    import torch.distributed as dist
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = a.shape[0] // world
    rows = slice(rank * n, (rank + 1) * n)
    mine = {
        "open_clip": (OpenSigLipLoss(rank=rank, world_size=world), torch.float32),
        "open_clip_64": (OpenSigLipLoss(rank=rank, world_size=world), torch.float64),
        "open_clip_bf16": (OpenSigLipLoss(rank=rank, world_size=world), torch.bfloat16),
        "torch": (SigLipLoss(rank=rank, world_size=world, backend="torch"), torch.float32),
        "gather_bf16": (SigLipLoss(rank=rank, world_size=world), torch.bfloat16),
    }
    for impl in ("gather", "shift", "bidir", "reduce"):
        mine[impl] = (SigLipLoss(rank=rank, world_size=world, dist_impl=impl), torch.float32)
    results = {}
    for name, (loss_fn, dtype) in mine.items():
        results[name] = [t.numpy() for t in _grads(loss_fn, a[rows], b[rows], s, bias, dtype)]
    out.put((rank, results))
    dist.barrier()
    dist.destroy_process_group()
    out.close()
    out.join_thread()
    os._exit(0)  # see tests/test_loss.py: a spawned gloo worker's teardown once aborted on an oversubscribed machine


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_match_open_clip_rank_by_rank_and_one_rank_on_the_global_batch(world):
    a, b, s, bias = features(5 * world, 33, seed=world, bias=(-12.0, -5.0))  # 5 rows a rank, D = 33
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, world, port, a, b, s, bias, out)) for r in range(world)]
    for p in procs:
        p.start()
    per_rank = dict(out.get(timeout=180) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for results in per_rank.values():
        ref = [torch.from_numpy(t) for t in results["open_clip_64"]]
        for name in ("gather", "shift", "bidir", "reduce", "torch", "open_clip"):
            for got, want, what in zip(results[name], ref, NAMES):
                torch.testing.assert_close(torch.from_numpy(got), want, rtol=2e-5, atol=2e-6, msg=f"{name} {what}")
        ours, plain = (
            _errors([torch.from_numpy(t) for t in results[k]], ref) for k in ("gather_bf16", "open_clip_bf16")
        )
        _assert_error_rule(ours, plain, _floor(torch.bfloat16, 5, s))
    # what a data-parallel engine makes of them: the mean over ranks is the one-rank loss of the whole batch
    one = _grads(_open_clip, a, b, s, bias, torch.float64)
    ranks = [[torch.from_numpy(t) for t in per_rank[r]["gather"]] for r in range(world)]
    torch.testing.assert_close(sum(r[0] for r in ranks) / world, one[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[1] for r in ranks]) / world, one[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r[2] for r in ranks]) / world, one[2], rtol=1e-5, atol=1e-6)
    for k in (3, 4):
        torch.testing.assert_close(sum(r[k] for r in ranks) / world, one[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("n, d", [(1, 64), (127, 500), (1000, 512), (4096, 768)])
def test_triton_cuda_bf16_error_rule(n, d):
    """The Triton kernel on the GPU, bf16, against float64, next to open_clip's SigLipLoss under bf16 autocast."""
    a, b, s, bias = (t.cuda() for t in features(n, d, seed=n + d, bias=(-12.0, -5.0)))
    ref = _grads(_open_clip, a, b, s, bias, torch.float64)

    def open_clip_autocast(x, y, t, c):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return _open_clip(x, y, t, c)

    ours = _errors(_grads(SigLipLoss(), a, b, s, bias, torch.bfloat16), ref)
    plain = _errors(_grads(open_clip_autocast, a, b, s, bias, torch.bfloat16), ref)
    _assert_error_rule(ours, plain, _floor(torch.bfloat16, n, s))
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # fp32 products, not tf32 (a trainer in this process sets "high")
    try:
        fp32 = _errors(_grads(SigLipLoss(), a, b, s, bias, torch.float32), ref)
    finally:
        torch.set_float32_matmul_precision(before)
    assert all(e <= 2e-4 * max(1.0, float(r.abs().max())) for e, r in zip(fp32, ref)), fp32
