"""The CUDA launch plan of the fused loss counted two ways: from the launches the launchers make (kernels replaced
by recorders, configs and SM count as on an H100/H200) and from ``launch_plan``; both against the header's
budget of 8 n N D FLOPs, one exponential per logit per pass, a dL buffer within its bound."""

from __future__ import annotations

import pytest
import torch
import triton

from fastclip.kernels import contrastive_lse as K


class Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **meta)`` records the launch, runs nothing."""

    def __init__(self, kernel, launches):
        self.names, self.launches = kernel.arg_names, launches

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.launches.append((grid, dict(zip(self.names, args)), meta))

        return launch


def _executed(launches, D: int) -> dict:
    """FLOPs and exponentials of the recorded launches, each program's tiles counted from its own arguments."""
    flops = exps = 0
    for grid, args, meta in launches:
        bm, bn, bd = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_D"]
        tile = 2 * bm * bn * triton.cdiv(D, bd) * bd
        if "cols_per_split" in args:  # _sums_kernel: grid (row blocks, splits), each split's columns in tiles
            n_cols, per = args["N"], args["cols_per_split"]
            tiles = grid[0] * sum(triton.cdiv(min(per, n_cols - c), bn) for c in range(0, n_cols, per))
        elif "n_chunk" in args and not meta["EXACT"]:  # _dlogits_kernel: one tile per program
            tiles = grid[0] * grid[1]
        else:  # the finishing and exact passes: no tile work when no row or column is guarded
            tiles = 0
        flops, exps = flops + tiles * tile, exps + tiles * bm * bn
    return {"flops": flops, "exponentials": exps}


@pytest.mark.parametrize("n, N, D", [(4096, 4096, 512), (1000, 3000, 500), (512, 8192, 768)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_launches_match_the_plan_and_the_header(monkeypatch, n, N, D, dtype):
    launches: list = []
    for name in ("_sums_kernel", "_finish_kernel", "_dlogits_kernel"):
        monkeypatch.setattr(K, name, Recorder(getattr(K, name), launches))
    key = "cuda32" if dtype == torch.float32 else "cuda16"
    monkeypatch.setattr(K, "config", lambda kind, x: K.CONFIGS[kind][key])
    monkeypatch.setattr(K, "sm_count", lambda device: 132)
    monkeypatch.setattr(K, "DL_BUFFER_BYTES", 8 << 20)  # several backward chunks at these sizes
    q, k = torch.randn(n, D).to(dtype), torch.randn(N, D).to(dtype)
    s = torch.tensor(10.0)
    K.lse_forward(q, k, s, True)
    fwd = _executed(launches, D)
    launches.clear()
    # the backward's two GEMMs per chunk (dq = dL k, dk += dL^T q; cuBLAS on a GPU) counted from their shapes, not
    # run: the recorded kernels leave dL garbage, and emulated bf16 GEMMs at 4096 x 4096 took 20 s on this CPU
    gemm_flops: list[int] = []

    def mm(a, b, out):
        assert a.dtype == b.dtype and a.shape[1] == b.shape[0] and out.shape == (a.shape[0], b.shape[1])
        gemm_flops.append(2 * a.shape[0] * a.shape[1] * b.shape[1])
        return out

    lse_r, lse_c, g_r, g_c = torch.zeros(n), torch.zeros(N), torch.ones(n), torch.ones(N)
    with monkeypatch.context() as patch:  # torch.mm itself again right after
        patch.setattr(K.torch, "mm", mm)
        patch.setattr(K, "_accumulate", lambda acc, a, b: mm(a, b, acc))
        K.lse_backward(q, k, s, lse_r, lse_c, g_r, g_c)
    bwd = _executed(launches, D)
    plan = K.launch_plan(n, N, D, with_col=True, dtype=dtype, sms=132)

    assert fwd["flops"] == plan["forward_flops"] and fwd["exponentials"] == plan["forward_exponentials"]
    assert sum(gemm_flops) == 4 * n * N * D and len(gemm_flops) == 2 * plan["backward_chunks"]
    assert bwd["flops"] + sum(gemm_flops) == plan["backward_flops"]
    assert bwd["exponentials"] == plan["backward_exponentials"]
    # the header: 2 nND forward, 6 nND backward, executed = useful up to the tiles' padding of n, N and D
    fb, bb = K.CONFIGS["fwd"][key], K.CONFIGS["bwd"][key]
    pad_f = (
        (triton.cdiv(n, fb[0]) * fb[0] / n) * (triton.cdiv(N, fb[1]) * fb[1] / N) * (triton.cdiv(D, fb[2]) * fb[2] / D)
    )
    assert 2 * n * N * D <= plan["forward_flops"] <= 2 * n * N * D * pad_f * 1.0001
    assert 6 * n * N * D <= plan["backward_flops"] <= 2 * n * N * D * (2 + pad_f * 1.5)
    if n % 128 == 0 and N % 128 == 0 and D % 64 == 0:
        assert plan["forward_flops"] + plan["backward_flops"] == plan["useful_flops"] == 8 * n * N * D
    assert plan["dl_buffer_bytes"] <= max(8 << 20, bb[0] * N * 4)
    assert plan["backward_chunks"] == sum(1 for *_, m in launches if not m["EXACT"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_adds_the_product_into_the_fp32_gradient(dtype):
    """dk += dL^T q, the backward GEMM the plan test counts without running: into the fp32 accumulator, within the
    operands' dtype's rounding of the product (a CPU has no addmm with out_dtype: the product is rounded first)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 96, generator=g).to(dtype), torch.randn(96, 40, generator=g).to(dtype)
    acc = torch.randn(64, 40, generator=g)
    want = acc.double() + a.double() @ b.double()
    got = K._accumulate(acc.clone(), a, b)
    assert got.dtype == torch.float32 and got.shape == acc.shape
    assert float((got.double() - want).abs().max() / want.abs().max()) <= 4 * torch.finfo(dtype).eps


def test_h100_shapes_are_exact_and_fill_the_card():
    """At the benchmark's shapes the executed work is the useful work, and a local loss (512 rows on each of 64
    ranks) still gives the forward a program for every one of 132 SMs (4 row blocks without the column split)."""
    plan = K.launch_plan(32768, 32768, 512, with_col=True, dtype=torch.bfloat16, sms=132)
    assert plan["forward_flops"] + plan["backward_flops"] == 8 * 32768 * 32768 * 512
    assert plan["forward_exponentials"] == plan["backward_exponentials"] == 32768 * 32768
    assert plan["dl_buffer_bytes"] <= K.DL_BUFFER_BYTES
    local = K.launch_plan(512, 32768, 512, with_col=False, dtype=torch.bfloat16, sms=132)
    assert local["column_splits"] * triton.cdiv(512, K.CONFIGS["fwd"]["cuda16"][0]) >= 132
