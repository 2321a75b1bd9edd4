"""Triton kernel of the fused sigmoid (SigLIP) loss (CUDA; also run by the interpreter on CPU).

With z = s * x y^T + b for image features x [n, D] and text features y [N, D], and y_ij = +1 on the positive
pairs (j = i + offset; none when offset >= N) and -1 elsewhere:

    loss_sum  = sum_ij softplus(-y_ij z_ij)                       (open_clip's -logsigmoid(labels * logits))
    gradient  dz_ij = -y_ij sigmoid(-y_ij z_ij);  dx = s dz y,  dy = s dz^T x,  ds = sum dz (x . y),  db = sum dz

The loss is a scalar, so its backward only scales the gradient of loss_sum: with ``with_grad`` the forward
computes that gradient in the same pass (fastclip.ops keeps it for the backward). One pass over the logit tiles
then costs 3 GEMMs (6 n N D FLOPs) where a forward and a recomputing backward would cost 4 (8 n N D).

Per tile (one program each): the tile's GEMM (contrastive_lse's _tile_dot: TMA descriptors, or pointer loads for
rows not 16-byte aligned), then elementwise t = -y z, e = exp(-|t|) (<= 1: no overflow), softplus(t) = max(t, 0)
+ log1p(e) with log1p kept exact for tiny e (Goldberg's log(u) e / (u - 1), u = 1 + e: a trained SigLIP's
negatives sit near z = -10, where log(1 + e) in fp32 would lose a thousandth of each term), sigmoid(t) = 1 / u or
e / u by the sign of t. Each program writes its tile's loss, ds and db shares to a partial buffer (summed by torch:
deterministic, no atomics) and, with grad, s dz to a chunk buffer of C x N (bf16 for bf16 inputs, else fp32;
C rows at a time, <= DL_BUFFER_BYTES, never n x N); dx and dy are then cuBLAS GEMMs accumulated in fp32.

Budget per call: FLOPs 2 n N D (tiles) + 4 n N D (GEMMs, with grad); per logit one exp2, one log2, two
divisions; bytes: the dz buffer written once and read by each GEMM (3 n N x 2 bytes in bf16). Not yet measured on a
GPU (benchmarks/gpu_precheck.py and bench_loss.py have the cases).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .contrastive_lse import _accumulate, _precision, _tile_dot, chunk_rows, descriptors

# Tile configs (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for sm_90 by dtype class. Not contrastive_lse's
# backward 64 x 128 at 4 warps: with this epilogue's live tiles (raw, t, e, 1 + e) it took 255 registers and spilled
# (48 bytes in bf16, 652 in fp16, whose dz is fp32; tests/test_kernel_compile.py); 128 x 64 at 8 warps does not
# (and ran within 1% of it for the LSE backward on an H200). Not yet timed on a GPU for this kernel.
CONFIGS = {"cuda16": (128, 64, 64, 8, 3), "cuda32": (128, 64, 32, 8, 3), "interpreter": (16, 16, 16, 1, 1)}


def config(x: torch.Tensor) -> tuple[int, int, int, int, int]:
    if x.device.type != "cuda":
        return CONFIGS["interpreter"]
    return CONFIGS["cuda32" if x.dtype == torch.float32 else "cuda16"]


@triton.jit
def _sigmoid_tile_kernel(
    XD, YD, X, Y, S, BIAS, DLD, DL, PARTS,
    row0, n_chunk, N, D, stride_x, stride_y, stride_dl, offset,
    WITH_GRAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """One tile of rows [row0, row0 + n_chunk): its loss (and ds, db) shares into PARTS [3, programs]; s dz into DL."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    programs = tl.num_programs(0) * tl.num_programs(1)
    part = pid_m.to(tl.int64) * tl.num_programs(1) + pid_n
    local = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rows = row0 + local
    row_ok = local < n_chunk
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    s = tl.load(S).to(tl.float32)
    b = tl.load(BIAS).to(tl.float32)
    raw = _tile_dot(XD, YD, X, Y, row0 + pid_m * BLOCK_M, pid_n * BLOCK_N, rows, cols, row_ok, col_ok, D,
                    stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, TMA)  # fmt: skip
    z = raw * s + b
    pos = cols[None, :] == rows[:, None] + offset
    t = tl.where(pos, -z, z)  # -y z
    e = tl.exp2(-tl.abs(t) * 1.4426950408889634)
    u = 1.0 + e
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    softplus = tl.where(ok, tl.maximum(t, 0.0) + log1p_e, 0.0)
    tl.store(PARTS + part, tl.sum(tl.sum(softplus, axis=1), axis=0))
    if WITH_GRAD:
        r = 1.0 / u
        sig = tl.where(t >= 0.0, r, e * r)  # sigmoid(-y z)
        dz = tl.where(ok, tl.where(pos, -sig, sig), 0.0)
        tl.store(PARTS + programs + part, tl.sum(tl.sum(dz * raw, axis=1), axis=0))
        tl.store(PARTS + 2 * programs + part, tl.sum(tl.sum(dz, axis=1), axis=0))
        if TMA:  # rows and columns past the buffer's edges are dropped by the copy engine
            DLD.store([pid_m * BLOCK_M, pid_n * BLOCK_N], (dz * s).to(DL.dtype.element_ty))
        else:
            ptrs = DL + local[:, None] * stride_dl + cols[None, :]
            tl.store(ptrs, (dz * s).to(DL.dtype.element_ty), mask=ok)


def _check(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        shapes = f"{tuple(x.shape)}, {tuple(y.shape)}"
        raise ValueError(f"sigmoid_loss: q must be [n, D] and k [N, D] with one D, got {shapes}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"sigmoid_loss: q and k need at least one row, got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"sigmoid_loss: q and k must share a dtype of fp32/fp16/bf16, got {x.dtype}, {y.dtype}")
    if len({x.device, y.device, scale.device, bias.device}) != 1:
        raise ValueError(
            f"sigmoid_loss: q, k, scale and bias must be on one device, got {x.device}, {y.device}, {scale.device}, "
            f"{bias.device}"
        )
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("sigmoid_loss: q and k must be contiguous along D (call .contiguous())")


def sigmoid_forward(q, k, scale, bias, offset: int, with_grad: bool):
    """(loss_sum [] fp32, dq [n, D] fp32, dk [N, D] fp32, [dscale, dbias] fp32); without grad the last three are
    1-element placeholders (empty tensors would share a null storage: a custom op's outputs may not alias)."""
    _check(q, k, scale, bias)
    s, b = scale.reshape(1).float(), bias.reshape(1).float()
    n, N, D = q.shape[0], k.shape[0], q.shape[1]
    bm, bn, bd, warps, stages = config(q)
    prec = _precision(q)
    # bf16 dz feeds bf16 GEMMs (as autocast's backward would); fp16's range is too narrow, so fp16 and fp32 go
    # through fp32 GEMMs (tf32 where torch allows it)
    gemm_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    chunk = chunk_rows(n, N, bm, gemm_dtype.itemsize) if with_grad else n
    qd, kd, tma = descriptors(q, k, bm, bn, bd)
    if with_grad:
        qg, kg = (q, k) if gemm_dtype == q.dtype else (q.float(), k.float())
        pad = 16 // gemm_dtype.itemsize  # rows of dz 16-byte aligned, for the descriptor
        dl = torch.empty(chunk, triton.cdiv(N, pad) * pad, device=q.device, dtype=gemm_dtype)[:, :N]
        dq = torch.zeros(n, D, device=q.device, dtype=torch.float32)
        dk = torch.zeros(N, D, device=q.device, dtype=torch.float32)
    else:
        dl = torch.empty(1, 1, device=q.device, dtype=gemm_dtype)  # not written
    sums = torch.zeros(3, device=q.device, dtype=torch.float32)
    for r0 in range(0, n, chunk):
        c = min(chunk, n - r0)
        grid = (triton.cdiv(c, bm), triton.cdiv(N, bn))
        dld = dl[:c]
        if tma and with_grad:
            from triton.tools.tensor_descriptor import TensorDescriptor

            dld = TensorDescriptor.from_tensor(dl[:c], [bm, bn])
        parts = torch.zeros(3, grid[0] * grid[1], device=q.device, dtype=torch.float32)  # ds, db stay 0 without grad
        _sigmoid_tile_kernel[grid](
            qd, kd, q, k, s, b, dld, dl, parts, r0, c, N, D, q.stride(0), k.stride(0), dl.stride(0), offset,
            WITH_GRAD=with_grad, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=prec, TMA=tma,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        sums += parts.sum(1)
        if with_grad:
            dq[r0 : r0 + c] = _accumulate(dq[r0 : r0 + c], dl[:c], kg)
            dk = _accumulate(dk, dl[:c].T, qg[r0 : r0 + c])
    loss = sums[0].clone()  # outputs of a custom op may not alias one another
    if not with_grad:
        return loss, *(torch.zeros(1, device=q.device, dtype=torch.float32) for _ in range(3))  # placeholders
    return loss, dq, dk, sums[1:].clone()
