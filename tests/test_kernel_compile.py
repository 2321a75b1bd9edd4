"""The Triton kernels compiled offline for Hopper (sm_90a), no GPU needed: every tile config a launcher can pick
issues tensor-core instructions (wgmma), keeps its registers (no spills) and fits Hopper's shared memory. The
contrastive LSE kernels (kernels/contrastive_lse.py) and the sigmoid loss's tile kernel (kernels/sigmoid_loss.py).

Triton's bundled ptxas gives the register and spill figures; Triton's metadata the shared memory. Each case prints
its figures (pytest -s shows them)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
from test_kernel_plan import Recorder  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastclip.kernels import contrastive_lse as K  # noqa: E402
from fastclip.kernels import sigmoid_loss as SL  # noqa: E402

SIGMOID_KERNEL = SL._sigmoid_tile_kernel  # the kernel itself: a test stands a recorder in for it in its module
HOPPER_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB)
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _ptxas() -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "ptxas")
    if not os.path.exists(path):
        pytest.skip(f"triton ships no ptxas at {path}")
    return path


def _signature(kernel, dtype, cfg, tma: bool, constexprs: dict) -> dict:
    bm, bn, bd = cfg[:3]
    t = TYPES[dtype]
    # the sigmoid launcher makes the dz buffer's descriptor only when the kernel writes it (WITH_GRAD)
    dl_tma = tma and constexprs.get("WITH_GRAD", True)
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("XD", "YD"):
            rows = bm if name == "XD" else bn
            sig[name] = f"tensordesc<{t}[{rows}, {bd}]>" if tma else f"*{t}"
        elif name in ("X", "Y"):
            sig[name] = f"*{t}"
        elif name == "DLD":
            t_dl = "bf16" if dtype == torch.bfloat16 else "fp32"
            sig[name] = f"tensordesc<{t_dl}[{bm}, {bn}]>" if dl_tma else f"*{t_dl}"
        elif name == "DL":
            sig[name] = "*bf16" if dtype == torch.bfloat16 else "*fp32"
        elif name in ("n", "N", "D", "row0", "n_chunk", "cols_per_split", "offset") or name.startswith("stride"):
            sig[name] = "i32"
        else:
            sig[name] = "*fp32"
    return sig


def compile_sm90(kernel, dtype, cfg, constexprs: dict, tma: bool = True):
    """(compiled kernel, ptxas -v text) for sm_90a."""
    bm, bn, bd, warps, stages = cfg
    consts = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "TMA": tma,
              "PRECISION": "tf32" if dtype != torch.float32 else "tf32", **constexprs}  # fmt: skip
    src = ASTSource(fn=kernel, signature=_signature(kernel, dtype, cfg, tma, consts), constexprs=consts)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    out = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", "-o", os.devnull, "-"], input=ptx, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return compiled, out.stderr


def _figures(name: str, dtype, cfg, compiled, ptxas: str) -> int:
    """Print the kernel's registers, spills and shared memory; return the spill stores (bytes)."""
    registers = max(int(x) for x in re.findall(r"Used (\d+) registers", ptxas))
    spills = max(int(x) for x in re.findall(r"(\d+) bytes spill stores", ptxas))
    print(f"\n{name} {TYPES[dtype]} {cfg}: {registers} registers, {spills} bytes spilled, "
          f"{compiled.metadata.shared} bytes shared memory")  # fmt: skip
    return spills


KERNELS = [
    ("fwd", K._sums_kernel, {"WITH_COL": True}),
    ("fwd", K._finish_kernel, {}),
    ("bwd", K._dlogits_kernel, {"HAS_GX": True, "HAS_GY": True, "EXACT": False}),
    ("bwd", K._dlogits_kernel, {"HAS_GX": True, "HAS_GY": True, "EXACT": True}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("kind, kernel, constexprs", KERNELS, ids=lambda v: getattr(v, "__name__", None))
def test_every_launch_config_compiles_for_hopper_on_tensor_cores(kind, kernel, constexprs, dtype):
    cfg = K.CONFIGS[kind]["cuda32" if dtype == torch.float32 else "cuda16"]
    compiled, ptxas = compile_sm90(kernel, dtype, cfg, constexprs)
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx, f"{kernel.__name__} {dtype} {cfg}: no wgmma in the PTX"
    assert "cp.async.bulk.tensor" in ptx, f"{kernel.__name__} {dtype} {cfg}: tiles not loaded by TMA"
    spills = _figures(f"{kernel.__name__} {constexprs}", dtype, cfg, compiled, ptxas)
    assert spills == 0, f"{kernel.__name__} {dtype} {cfg}: register spills\n{ptxas}"
    assert compiled.metadata.shared <= HOPPER_SHARED, (kernel.__name__, dtype, cfg, compiled.metadata.shared)


def _sigmoid_launch(monkeypatch, dtype, with_grad: bool) -> tuple:
    """The tile config sigmoid_forward launches its kernel with on an H100/H200, recorded from the launcher itself
    (on CPU tensors, the configs as on CUDA), so that what it picks, not a copy of its choice, is compiled here."""
    launches: list = []
    monkeypatch.setattr(SL, "_sigmoid_tile_kernel", Recorder(SL._sigmoid_tile_kernel, launches))
    key = "cuda32" if dtype == torch.float32 else "cuda16"
    monkeypatch.setattr(SL, "config", lambda x: SL.CONFIGS[key])
    q, k = torch.randn(256, 64).to(dtype), torch.randn(256, 64).to(dtype)
    SL.sigmoid_forward(q, k, torch.tensor(10.0), torch.tensor(-10.0), 0, with_grad)  # the GEMMs run on garbage dz
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "num_warps", "num_stages")
    metas = {tuple(meta[m] for m in keys) for *_, meta in launches}
    assert len(metas) == 1 and all(meta["WITH_GRAD"] == with_grad for *_, meta in launches), launches
    return metas.pop()


@pytest.mark.parametrize("with_grad", [True, False], ids=["with_grad", "loss_only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=TYPES.get)
def test_sigmoid_kernel_compiles_for_hopper_on_tensor_cores(monkeypatch, dtype, with_grad):
    cfg = _sigmoid_launch(monkeypatch, dtype, with_grad)
    compiled, ptxas = compile_sm90(SIGMOID_KERNEL, dtype, cfg, {"WITH_GRAD": with_grad})
    ptx = compiled.asm["ptx"]
    assert "wgmma.mma_async" in ptx, f"_sigmoid_tile_kernel {dtype} {cfg}: no wgmma in the PTX"
    assert "cp.async.bulk.tensor" in ptx, f"_sigmoid_tile_kernel {dtype} {cfg}: tiles not loaded by TMA"
    assert compiled.metadata.shared <= HOPPER_SHARED, (dtype, cfg, compiled.metadata.shared)
    spills = _figures(f"_sigmoid_tile_kernel WITH_GRAD={with_grad}", dtype, cfg, compiled, ptxas)
    assert spills == 0, f"_sigmoid_tile_kernel {dtype} {cfg}: register spills\n{ptxas}"
    # the softplus's log1p(e) = log(u) e / (u - 1) needs log with a small relative error near 1 (libdevice's logf),
    # not lg2.approx (absolute error ~1e-7: 0.2% of each negative's term near z = -10)
    assert "lg2.approx" not in ptx, f"_sigmoid_tile_kernel {dtype}: log lowered to lg2.approx"
