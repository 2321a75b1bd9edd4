"""The Triton kernels compiled offline for Hopper (sm_90a), no GPU needed: every tile config a launcher can pick
issues tensor-core instructions (wgmma), keeps its registers (no spills) and fits Hopper's shared memory.

Triton's bundled ptxas gives the register and spill figures; Triton's metadata the shared memory."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastclip.kernels import contrastive_lse as K  # noqa: E402

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
            sig[name] = f"tensordesc<{t_dl}[{bm}, {bn}]>" if tma else f"*{t_dl}"
        elif name == "DL":
            sig[name] = "*bf16" if dtype == torch.bfloat16 else "*fp32"
        elif name in ("n", "N", "D", "row0", "n_chunk", "cols_per_split") or name.startswith("stride"):
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
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill stores", ptxas)]
    assert spills and max(spills) == 0, f"{kernel.__name__} {dtype} {cfg}: register spills\n{ptxas}"
    assert compiled.metadata.shared <= HOPPER_SHARED, (kernel.__name__, dtype, cfg, compiled.metadata.shared)
