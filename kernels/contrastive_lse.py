"""Triton kernels of the fused contrastive log-sum-exp (CUDA; also run by the interpreter on CPU).

With L = s * x y^T for "row" features x [n, D] and "column" features y [N, D]:

    forward   lse_x[i] = log sum_j exp(L[i, j])          one program per BLOCK_M rows, streaming y
    backward  dL[i, j] = g_x[i] exp(L[i, j] - lse_x[i]) + g_y[j] exp(L[i, j] - lse_y[j])
              dx      += dL y                               (the same kernel with x, y swapped gives dy)
              ds       = sum dL * (x . y)                   (per-program partials, summed by the launcher)

Column LSEs are row LSEs of the transposed problem, so the same forward kernel runs twice, and the
backward kernel runs once per side. Online LSE (Milakov & Gimelshein 2018; FlashAttention, Dao 2022):
m' = max(m, max_j L), l' = l 2^(m - m') + sum_j 2^(L - m'), in base 2 with s log2(e) folded into the tile.

Budget per call (N x N logits, D features, b bytes per element):
    FLOPs    forward 2 x 2N^2 D (rows, then columns); backward 2 x (2N^2 D recompute + 2N^2 D product)
    memory   reads O(N^2 D b / BLOCK_M) (y streamed once per row block), writes O(N D); no N x N buffer.
Block sizes: Hopper table below (BLOCK_M x BLOCK_N tiles of bf16 through wgmma); small blocks for the
interpreter. Program ids are cast to int64 before offsets are formed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) by device class; chosen for H100 (sm_90) bf16 tiles
# that keep the fp32 accumulator of one BLOCK_M x BLOCK_N tile in registers.
_BLOCKS = {
    "cuda": (128, 64, 64, 8, 3),
    "interpreter": (16, 16, 16, 1, 1),
}


def _blocks(device: torch.device):
    return _BLOCKS["cuda"] if device.type == "cuda" else _BLOCKS["interpreter"]


@triton.jit
def _tile_dot(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """x[rows] . y[cols] for one BLOCK_M x BLOCK_N tile, fp32, D in chunks of BLOCK_D."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        d_ok = dims < D
        x = tl.load(X + rows[:, None] * stride_x + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        y = tl.load(Y + cols[:, None] * stride_y + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE:
            acc = tl.dot(x, tl.trans(y), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(y), acc)
    return acc


@triton.jit
def _lse_fwd_kernel(
    X, Y, S, LSE,
    n, N, D,
    stride_x, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n
    scale2 = tl.load(S).to(tl.float32) * 1.4426950408889634  # s * log2(e): tiles come out in base 2
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        acc = _tile_dot(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)
        t = tl.where(col_ok[None, :], acc * scale2, float("-inf"))  # L / ln 2
        m_new = tl.maximum(m, tl.max(t, axis=1))
        total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
        m = m_new
    tl.store(LSE + rows, (m + tl.log2(total)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _lse_bwd_kernel(
    X, Y, S, LSE_X, LSE_Y, G_X, G_Y, DX, DS_PART,
    n, N, D,
    stride_x, stride_y, stride_dx,
    HAS_GX: tl.constexpr, HAS_GY: tl.constexpr, WRITE_DS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n
    s = tl.load(S).to(tl.float32)
    scale2 = s * 1.4426950408889634
    if HAS_GX:
        lse_x2 = tl.load(LSE_X + rows, mask=row_ok, other=0.0) * 1.4426950408889634
        g_x = tl.load(G_X + rows, mask=row_ok, other=0.0)
    ds_acc = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(0, N, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        raw = _tile_dot(X, Y, rows, cols, row_ok, col_ok, D, stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D, IEEE)
        t = raw * scale2  # x_i . y_j in base-2 logit units
        dl = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if HAS_GX:  # g_x[i] * P_row[i, j]
            dl += g_x[:, None] * tl.exp2(t - lse_x2[:, None])
        if HAS_GY:  # g_y[j] * P_col[i, j]
            lse_y2 = tl.load(LSE_Y + cols, mask=col_ok, other=0.0) * 1.4426950408889634
            g_y = tl.load(G_Y + cols, mask=col_ok, other=0.0)
            dl += g_y[None, :] * tl.exp2(t - lse_y2[None, :])
        dl = tl.where(row_ok[:, None] & col_ok[None, :], dl, 0.0)
        if WRITE_DS:
            ds_acc += tl.sum(dl * raw, axis=1)
        # dx[rows] += dL y, D in chunks; this program owns its rows, so the read-modify-write is race free
        for d0 in range(0, D, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            d_ok = dims < D
            y = tl.load(Y + cols[:, None] * stride_y + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            if IEEE:
                part = tl.dot(dl.to(y.dtype), y, input_precision="ieee")
            else:
                part = tl.dot(dl.to(y.dtype), y)
            ptrs = DX + rows[:, None] * stride_dx + dims[None, :]
            mask = row_ok[:, None] & d_ok[None, :]
            tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + part, mask=mask)
    if WRITE_DS:
        tl.store(DS_PART + pid, tl.sum(ds_acc, axis=0))


def _check(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(
            f"contrastive_lse: q must be [n, D] and k [N, D] with one D, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"contrastive_lse: q and k need at least one row, got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.dtype != y.dtype or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"contrastive_lse: q and k must share a dtype of fp32/fp16/bf16, got {x.dtype}, {y.dtype}")
    if x.device != y.device or scale.device != x.device:
        raise ValueError(
            f"contrastive_lse: q, k and scale must be on one device, got {x.device}, {y.device}, {scale.device}"
        )
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("contrastive_lse: q and k must be contiguous along D (call .contiguous())")


def _row_lse(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    block_m, block_n, block_d, warps, stages = _blocks(x.device)
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(x.shape[0], block_m),)
    _lse_fwd_kernel[grid](
        x, y, scale, out, x.shape[0], y.shape[0], x.shape[1], x.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=x.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def lse_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, with_col: bool):
    """(row_lse [n], col_lse [N] or [0]) of L = scale * q k^T, fp32."""
    _check(q, k, scale)
    scale = scale.reshape(()).float()
    row = _row_lse(q, k, scale)
    col = _row_lse(k, q, scale) if with_col else torch.empty(0, device=q.device, dtype=torch.float32)
    return row, col


def _side_grad(x, y, scale, lse_x, lse_y, g_x, g_y, *, write_ds: bool):
    block_m, block_n, block_d, warps, stages = _blocks(x.device)
    grid = (triton.cdiv(x.shape[0], block_m),)
    dx = torch.zeros(x.shape, device=x.device, dtype=torch.float32)
    ds_part = torch.zeros(grid[0] if write_ds else 1, device=x.device, dtype=torch.float32)
    has_gx, has_gy = g_x.numel() > 0, g_y.numel() > 0
    _lse_bwd_kernel[grid](
        x, y, scale,
        lse_x if has_gx else dx, lse_y if has_gy else dx, g_x if has_gx else dx, g_y if has_gy else dx,
        dx, ds_part, x.shape[0], y.shape[0], x.shape[1], x.stride(0), y.stride(0), dx.stride(0),
        HAS_GX=has_gx, HAS_GY=has_gy, WRITE_DS=write_ds,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, IEEE=x.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return dx, ds_part


def lse_backward(q, k, scale, row_lse, col_lse, grad_row, grad_col):
    """(dq, dk, dscale) for upstream gradients of (row_lse, col_lse); an empty grad means none."""
    _check(q, k, scale)
    s = scale.reshape(()).float()
    grad_row = grad_row.float().contiguous() if grad_row.numel() else grad_row
    grad_col = grad_col.float().contiguous() if grad_col.numel() else grad_col
    dq, ds_part = _side_grad(q, k, s, row_lse, col_lse, grad_row, grad_col, write_ds=True)
    dk, _ = _side_grad(k, q, s, col_lse, row_lse, grad_col, grad_row, write_ds=False)
    return (dq * s).to(q.dtype), (dk * s).to(k.dtype), ds_part.sum().reshape(())
