"""Triton kernels of the fused contrastive log-sum-exp (CUDA; also run by the interpreter on CPU).

With L = s * x y^T for "row" features x [n, D] and "column" features y [N, D]:

    forward   lse_x[i] = log sum_j exp(L[i, j]),  lse_y[j] = log sum_i exp(L[i, j])
    backward  dL[i, j] = g_x[i] exp(L[i, j] - lse_x[i]) + g_y[j] exp(L[i, j] - lse_y[j])
              dx = s dL y,  dy = s dL^T x,  ds = sum dL * (x . y)

Forward: one pass over the logit tiles gives both LSEs. CLIP's features are L2-normalized, so every logit is
bounded: L[i, j] <= B = s max|x| max|y| (B = s for unit features; computed on the device, no host sync). With
B as a fixed offset, e = exp(L - B) <= 1 serves the row sum and the column sum alike: one exponential per logit
(FlashAttention's running maximum needs one per direction), and the sums are plain additions, so any tiling of
the grid can add its partial sums with atomics; that is what lets a second grid axis split the columns when there
are few row blocks (a local loss: 512 rows against 32k columns). The guard: a row (column) whose sum falls below
2^-60 (its largest logit more than ~41 below B: unnormalized features, or a vanishing row) would lose terms to
underflow, so the finishing kernel recomputes exactly those blocks with the running maximum. Above 2^-60 the terms
lost to underflow (< 2^-126) weigh less than 2^-49 of the sum even over 2^17 columns.

Backward: the gradient of the logits is formed per tile in one exponential, dL = e (u_i + v_j) with u_i = g_x[i]
e^(B - lse_x[i]) and v_j likewise (a second launch rewrites the tiles holding a guarded row or column in the exact
two-exponential form; the others return at once), scaled by s and written in bf16 (fp32 for fp32/fp16 inputs:
fp16's range is too narrow for dL) to a chunk buffer of C x N (C rows at a time, <= 384 MiB, never N x N); dx and
dy are then two tensor-core GEMMs of cuBLAS (dx = dL y, dy += dL^T x accumulated in fp32 across chunks). bf16 dL
is what torch's autocast feeds its own backward GEMMs, so the error stays within the bf16 rule (measured).

Tiles move by TMA (tensor descriptors): Triton 3.6-3.8 do not software-pipeline this nested loop's pointer loads
(no cp.async in the PTX, 255 registers with spills), while descriptor loads are pipelined (3 stages, 98 KB of
shared memory, 150-180 registers, no spills). Rows not 16-byte aligned (D x itemsize) take the pointer path.

Budget per call (n rows, N columns, D features, b bytes per input element):
    FLOPs executed   forward 2 n N D; backward 2 n N D (recompute) + 2 x 2 n N D (GEMMs): 8 n N D in all,
                     the useful count (no recompute beyond the one the backward needs)
    exponentials     forward n N, backward n N
    bytes            forward: y streamed once per row block (n N D b / BLOCK_M) plus x once per tile
                     (n N D b / BLOCK_N), mostly from L2; backward: the dL buffer written once and read by each
                     GEMM (3 x n N x 2 bytes in bf16), y and x as in the forward for the tiles
    per tile         BLOCK_M x BLOCK_N x 2 D FLOPs against (BLOCK_M + BLOCK_N) D b bytes loaded: with 128 x 128
                     bf16 tiles, 64 FLOP per byte from L2, well inside an H100's L2 bandwidth at its matmul peak;
                     the backward's dL write adds 2 bytes per 2 D FLOPs (D FLOP/byte from HBM: 512 at D = 512,
                     above the H100's 295 ridge), so both kernels can be tensor-core bound.
Measured (H200, triton 3.6, benchmarks/results/h200-2026-11-27-loss.json; the card's bf16 matmul 779-785
TFLOP/s): forward + backward 456 TFLOP/s of 8 n N D at N = 32768, D = 512 (58% of that peak; 0.35x open_clip's
ClipLoss time, 0.037x its extra memory), 471 at D = 768 (60%; 0.44x, 0.044x), 456 / 463 at N = 65536. Where
the time goes at N = 32768, D = 512: forward 2.6 ms (417 TFLOP/s), backward 6.8 ms = dL kernel 3.5 ms (316
TFLOP/s: its bf16 dL write, 2 GB, is ~0.6 ms of it) + cuBLAS GEMMs 3.3 ms (660 TFLOP/s). What is left to reach
70%: the dL kernel (fuse dx = dL y into it, so dL is written once and read once) and the forward's epilogue
(one warpgroup's exponentials waiting on the other's wgmma: FA3's ping-pong, which Triton 3.6 does not schedule).
Interpreter: small blocks (tests). Program ids are cast to int64 before pointer offsets are formed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DL_BUFFER_BYTES = 384 << 20  # the backward's dL chunk, at most: extra memory <= 0.05x of the logits at N = 32768


# Tile configs (BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for sm_90 by dtype class, from the precheck's sweep
# of CANDIDATES on an H200 at N = 32768, D = 512 (forward + backward, ms): forward 128x128 w8 s3 9.72 (64x128 w4
# 9.89, 128x64 w4 10.64, 128x128 s4 10.56); backward 64x128 w4 10.03 (128x64 w4 10.10, 128x128 w8 11.03).
# fp32 (tf32) not swept. "interpreter": small blocks for the CPU tests.
CONFIGS = {
    "fwd": {"cuda16": (128, 128, 64, 8, 3), "cuda32": (128, 64, 32, 8, 3), "interpreter": (16, 16, 16, 1, 1)},
    "bwd": {"cuda16": (64, 128, 64, 4, 4), "cuda32": (128, 64, 32, 8, 3), "interpreter": (16, 16, 16, 1, 1)},
}
# every config a launcher can pick on a GPU (the offline sm_90a compile test covers each)
CANDIDATES = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]  # 128 x 256 spills


def config(kind: str, x: torch.Tensor) -> tuple[int, int, int, int, int]:
    if x.device.type != "cuda":
        return CONFIGS[kind]["interpreter"]
    return CONFIGS[kind]["cuda32" if x.dtype == torch.float32 else "cuda16"]


def _precision(x: torch.Tensor) -> str:
    """tl.dot's input precision: bf16/fp16 as they are; fp32 as tf32 when torch allows it for its own matmuls."""
    if x.dtype != torch.float32:
        return "tf32"  # ignored for 16-bit inputs
    return "ieee" if torch.get_float32_matmul_precision() == "highest" or x.device.type != "cuda" else "tf32"


@triton.jit
def _tile_dot(XD, YD, X, Y, r0, c0, rows, cols, row_ok, col_ok, D, stride_x, stride_y,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
              TMA: tl.constexpr):  # fmt: skip
    """x[rows] . y[cols] for one BLOCK_M x BLOCK_N tile (rows from r0, columns from c0), fp32 accumulation, D in
    chunks of BLOCK_D. TMA: tensor descriptors (Hopper's bulk copies, zero-filled past the edges; Triton pipelines
    them, 3.6-3.8 do not pipeline this loop's pointer loads); else pointer loads (rows not 16-byte aligned)."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        if TMA:
            x = XD.load([r0, d0])
            y = YD.load([c0, d0])
        else:
            dims = d0 + tl.arange(0, BLOCK_D)
            d_ok = dims < D
            x = tl.load(X + rows[:, None] * stride_x + dims[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            y = tl.load(Y + cols[:, None] * stride_y + dims[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _sums_kernel(
    XD, YD, X, Y, S, BOUND, ROW_SUM, COL_SUM,
    n, N, D, stride_x, stride_y, cols_per_split,
    WITH_COL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """Row (and column) sums of exp(L - B) over this program's rows and its split of the columns, added atomically."""
    pid_m = tl.program_id(0)  # int32 offsets for the descriptors; int64 for the pointers
    pid_s = tl.program_id(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n
    scale2 = tl.load(S).to(tl.float32) * 1.4426950408889634  # tiles come out in base 2
    bound2 = tl.load(BOUND) * 1.4426950408889634
    c_start = pid_s * cols_per_split
    c_end = tl.minimum(c_start + cols_per_split, N)
    row_acc = tl.zeros([BLOCK_M], tl.float32)
    for c0 in range(c_start, c_end, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < c_end
        acc = _tile_dot(XD, YD, X, Y, pid_m * BLOCK_M, c0, rows, cols, row_ok, col_ok, D,
                        stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, TMA)  # fmt: skip
        e = tl.exp2(acc * scale2 - bound2)
        e = tl.where(row_ok[:, None] & col_ok[None, :], e, 0.0)
        row_acc += tl.sum(e, axis=1)
        if WITH_COL:
            tl.atomic_add(COL_SUM + cols, tl.sum(e, axis=0), mask=col_ok, sem="relaxed")
    tl.atomic_add(ROW_SUM + rows, row_acc, mask=row_ok, sem="relaxed")


@triton.jit
def _finish_kernel(
    XD, YD, X, Y, S, BOUND, SUM, LSE,
    n, N, D, stride_x, stride_y,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """lse = B + log(sum); a block holding a sum below 2^-60 recomputes those rows with the running maximum."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n
    bound2 = tl.load(BOUND) * 1.4426950408889634
    sums = tl.load(SUM + rows, mask=row_ok, other=1.0)
    lse2 = bound2 + tl.log2(sums)
    low = row_ok & (sums < 8.673617379884035e-19)  # 2^-60: the guard (and lse - B < -60 in base 2 in _coefs)
    if tl.max(low.to(tl.int32), axis=0) > 0:
        scale2 = tl.load(S).to(tl.float32) * 1.4426950408889634
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        for c0 in range(0, N, BLOCK_N):
            cols = c0 + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = cols < N
            acc = _tile_dot(XD, YD, X, Y, pid * BLOCK_M, c0, rows, cols, low, col_ok, D, stride_x,
                            stride_y, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, TMA)  # fmt: skip
            t = tl.where(col_ok[None, :], acc * scale2, float("-inf"))
            m_new = tl.maximum(m, tl.max(t, axis=1))
            total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(t - m_new[:, None]), axis=1)
            m = m_new
        lse2 = tl.where(low, m + tl.log2(total), lse2)
    tl.store(LSE + rows, lse2 * 0.6931471805599453, mask=row_ok)


@triton.jit
def _coefs(LSE, G, idx, ok, bound2, HAS: tl.constexpr, SIZE: tl.constexpr):
    """(lse in base 2, g, g 2^(B2 - lse2) = g / sum, guarded) for the rows (or columns) idx of one tile."""
    if HAS:
        lse2 = tl.load(LSE + idx, mask=ok, other=0.0) * 1.4426950408889634
        g = tl.load(G + idx, mask=ok, other=0.0)
        return lse2, g, g * tl.exp2(bound2 - lse2), (ok & (lse2 - bound2 < -60.0)).to(tl.int32)
    else:
        zero = tl.zeros([SIZE], tl.float32)
        return zero, zero, zero, tl.zeros([SIZE], tl.int32)


@triton.jit
def _write_tile(DLD, DL, DS_PART, dl, raw, s, pid_m, pid_n, local, cols, row_ok, col_ok, stride_dl,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """s dL into the chunk buffer and the tile's share of ds = sum dL (x . y) into DS_PART."""
    dl = tl.where(row_ok[:, None] & col_ok[None, :], dl, 0.0)
    tl.store(DS_PART + pid_m.to(tl.int64) * tl.num_programs(1) + pid_n, tl.sum(tl.sum(dl * raw, axis=1), axis=0))
    if TMA:  # rows and columns past the buffer's edges are dropped by the copy engine
        DLD.store([pid_m * BLOCK_M, pid_n * BLOCK_N], (dl * s).to(DL.dtype.element_ty))
    else:
        ptrs = DL + local[:, None] * stride_dl + cols[None, :]
        tl.store(ptrs, (dl * s).to(DL.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dlogits_kernel(
    XD, YD, X, Y, S, BOUND, LSE_X, LSE_Y, G_X, G_Y, DLD, DL, DS_PART,
    row0, n_chunk, N, D, stride_x, stride_y, stride_dl,
    HAS_GX: tl.constexpr, HAS_GY: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """s * dL for one tile of the chunk's rows [row0, row0 + n_chunk), into DL; its share of ds into DS_PART.

    EXACT=False: every tile, one exponential per logit, dL = e^(L - B) (u_i + v_j). EXACT=True (launched after):
    only tiles holding a guarded row or column, rewritten with each direction against its own LSE; the others
    return at once. Two kernels rather than a branch in one: the branch held both forms' registers (255 against
    153 on sm_90a)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    local = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rows = row0 + local
    row_ok = local < n_chunk
    cols = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < N
    s = tl.load(S).to(tl.float32)
    bound2 = tl.load(BOUND) * 1.4426950408889634
    lse_x2, g_x, u, low = _coefs(LSE_X, G_X, rows, row_ok, bound2, HAS_GX, BLOCK_M)
    lse_y2, g_y, v, low_c = _coefs(LSE_Y, G_Y, cols, col_ok, bound2, HAS_GY, BLOCK_N)
    guarded = tl.maximum(tl.max(low, axis=0), tl.max(low_c, axis=0)) > 0
    if (not EXACT) or guarded:
        raw = _tile_dot(XD, YD, X, Y, row0 + pid_m * BLOCK_M, pid_n * BLOCK_N, rows, cols, row_ok, col_ok, D,
                        stride_x, stride_y, BLOCK_M, BLOCK_N, BLOCK_D, PRECISION, TMA)  # fmt: skip
        t = raw * (s * 1.4426950408889634)
        if EXACT:
            dl = g_x[:, None] * tl.exp2(t - lse_x2[:, None]) + g_y[None, :] * tl.exp2(t - lse_y2[None, :])
        else:
            dl = tl.exp2(t - bound2) * (u[:, None] + v[None, :])
        _write_tile(DLD, DL, DS_PART, dl, raw, s, pid_m, pid_n, local, cols, row_ok, col_ok, stride_dl,
                    BLOCK_M, BLOCK_N, TMA)  # fmt: skip


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


def bound(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """B = s max|q_i| max|k_j| >= every logit, as a 1-element fp32 tensor on the device (no host sync)."""
    qn = torch.linalg.vector_norm(q.float(), dim=1).amax()
    kn = torch.linalg.vector_norm(k.float(), dim=1).amax()
    return (scale.float().reshape(()) * qn * kn).reshape(1)


def _tma_ok(t: torch.Tensor) -> bool:
    """Tensor descriptors need 16-byte aligned rows (D x itemsize a multiple of 16) and base."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def descriptors(x: torch.Tensor, y: torch.Tensor, bm: int, bn: int, bd: int):
    """(x's, y's descriptor or the tensors themselves, TMA) for the kernels' _tile_dot."""
    if not (_tma_ok(x) and _tma_ok(y)):
        return x, y, False
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(x, [bm, bd]), TensorDescriptor.from_tensor(y, [bn, bd]), True


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 16  # the interpreter: enough that its tests (100 rows and columns, 16-wide tiles) split the columns
    return torch.cuda.get_device_properties(device).multi_processor_count


def column_splits(n: int, N: int, block_m: int, block_n: int, sms: int) -> int:
    """Second grid axis of the forward: enough programs for two waves of the card, each with >= 2 column tiles."""
    row_blocks = triton.cdiv(n, block_m)
    col_tiles = triton.cdiv(N, block_n)
    want = triton.cdiv(2 * sms, row_blocks)
    return max(1, min(want, col_tiles // 2))


def lse_forward(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, with_col: bool):
    """(row_lse [n], col_lse [N] or [0]) of L = scale * q k^T, fp32."""
    _check(q, k, scale)
    scale = scale.reshape(()).float()
    n, N, D = q.shape[0], k.shape[0], q.shape[1]
    bm, bn, bd, warps, stages = config("fwd", q)
    prec = _precision(q)
    b = bound(q, k, scale)
    row_sum = torch.zeros(n, device=q.device, dtype=torch.float32)
    col_sum = torch.zeros(N if with_col else 1, device=q.device, dtype=torch.float32)
    splits = column_splits(n, N, bm, bn, sm_count(q.device))
    per_split = triton.cdiv(triton.cdiv(N, splits), bn) * bn
    grid = (triton.cdiv(n, bm), triton.cdiv(N, per_split))
    qd, kd, tma = descriptors(q, k, bm, bn, bd)
    _sums_kernel[grid](
        qd, kd, q, k, scale, b, row_sum, col_sum, n, N, D, q.stride(0), k.stride(0), per_split,
        WITH_COL=with_col, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=prec, TMA=tma,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    row = _finish(q, k, scale, b, row_sum, prec)
    col = _finish(k, q, scale, b, col_sum, prec) if with_col else torch.empty(0, device=q.device, dtype=torch.float32)
    return row, col


def _finish(x, y, scale, b, sums, prec):
    bm, bn, bd, warps, stages = config("fwd", x)
    out = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)
    xd, yd, tma = descriptors(x, y, bm, bn, bd)
    _finish_kernel[(triton.cdiv(x.shape[0], bm),)](
        xd, yd, x, y, scale, b, sums, out, x.shape[0], y.shape[0], x.shape[1], x.stride(0), y.stride(0),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=prec, TMA=tma, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def chunk_rows(n: int, N: int, block_m: int, elem_bytes: int) -> int:
    """Rows of dL per backward chunk: all of them if C x N fits DL_BUFFER_BYTES, else a multiple of block_m."""
    fit = DL_BUFFER_BYTES // (N * elem_bytes)
    return n if fit >= n else max(block_m, fit // block_m * block_m)


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc + a @ b in fp32 for 16-bit a, b: cuBLAS accumulates and adds in fp32 where torch offers out_dtype."""
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    try:
        return torch.addmm(acc, a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError):  # torch without addmm(out_dtype): the product is rounded to 16 bits first
        return acc.add_(a @ b)


def lse_backward(q, k, scale, row_lse, col_lse, grad_row, grad_col):
    """(dq, dk, dscale) for upstream gradients of (row_lse, col_lse); an empty grad means none."""
    _check(q, k, scale)
    s = scale.reshape(()).float()
    n, N, D = q.shape[0], k.shape[0], q.shape[1]
    has_gx, has_gy = grad_row.numel() > 0, grad_col.numel() > 0
    grad_row = grad_row.float().contiguous() if has_gx else grad_row
    grad_col = grad_col.float().contiguous() if has_gy else grad_col
    bm, bn, bd, warps, stages = config("bwd", q)
    prec = _precision(q)
    b = bound(q, k, s)
    # bf16 dL feeds bf16 GEMMs (as autocast's backward does); fp16's range is too narrow for dL, so fp16 and fp32
    # go through fp32 GEMMs (tf32 where torch allows it)
    gemm_dtype = torch.bfloat16 if q.dtype == torch.bfloat16 else torch.float32
    qg, kg = (q, k) if gemm_dtype == q.dtype else (q.float(), k.float())
    chunk = chunk_rows(n, N, bm, gemm_dtype.itemsize)
    pad = 16 // gemm_dtype.itemsize  # rows of dL 16-byte aligned, for the descriptor
    dl = torch.empty(chunk, triton.cdiv(N, pad) * pad, device=q.device, dtype=gemm_dtype)[:, :N]
    dq = torch.empty(n, D, device=q.device, dtype=gemm_dtype)
    dk = torch.zeros(N, D, device=q.device, dtype=torch.float32)
    ds = torch.zeros((), device=q.device, dtype=torch.float32)
    dummy = row_lse if row_lse.numel() else b
    qd, kd, tma = descriptors(q, k, bm, bn, bd)
    for r0 in range(0, n, chunk):
        c = min(chunk, n - r0)
        grid = (triton.cdiv(c, bm), triton.cdiv(N, bn))
        dld = dl[:c]
        if tma:
            from triton.tools.tensor_descriptor import TensorDescriptor

            dld = TensorDescriptor.from_tensor(dl[:c], [bm, bn])
        ds_part = torch.empty(grid[0] * grid[1], device=q.device, dtype=torch.float32)
        for exact in (False, True):  # the exact pass rewrites guarded tiles only
            _dlogits_kernel[grid](
                qd, kd, q, k, s, b, row_lse if has_gx else dummy, col_lse if has_gy else dummy,
                grad_row if has_gx else dummy, grad_col if has_gy else dummy, dld, dl, ds_part,
                r0, c, N, D, q.stride(0), k.stride(0), dl.stride(0),
                HAS_GX=has_gx, HAS_GY=has_gy, EXACT=exact, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PRECISION=prec,
                TMA=tma, num_warps=warps, num_stages=stages,
            )  # fmt: skip
        ds += ds_part.sum()
        torch.mm(dl[:c], kg, out=dq[r0 : r0 + c])
        dk = _accumulate(dk, dl[:c].T, qg[r0 : r0 + c])
    return dq.to(q.dtype), dk.to(k.dtype), ds


def launch_plan(n: int, N: int, D: int, *, with_col: bool, dtype: torch.dtype, sms: int) -> dict:
    """What one forward + backward executes on CUDA when no row is guarded, counted from the launchers' own grids
    and tiles (masked lanes included): FLOPs, exponentials and the bytes the header's budget names, beside the
    header's useful count 8 n N D. tests/test_kernel_plan.py checks it against the launches the launchers make."""
    key = "cuda32" if dtype == torch.float32 else "cuda16"
    bm, bn, bd, *_ = CONFIGS["fwd"][key]
    splits = column_splits(n, N, bm, bn, sms)
    per_split = triton.cdiv(triton.cdiv(N, splits), bn) * bn
    fwd_tiles = triton.cdiv(n, bm) * sum(triton.cdiv(min(per_split, N - c), bn) for c in range(0, N, per_split))
    fwd_tile = (bm, bn, triton.cdiv(D, bd) * bd)
    bm, bn, bd, *_ = CONFIGS["bwd"][key]
    dl_elem = 2 if dtype == torch.bfloat16 else 4
    chunk = chunk_rows(n, N, bm, dl_elem)
    bwd_tiles = sum(triton.cdiv(min(chunk, n - r), bm) for r in range(0, n, chunk)) * triton.cdiv(N, bn)
    bwd_tile = (bm, bn, triton.cdiv(D, bd) * bd)
    gemm_flops = 2 * (2 * n * N * D)  # cuBLAS: dx = dL y and dy += dL^T x, exact shapes
    plan = {"useful_flops": 8 * n * N * D, "column_splits": splits, "backward_chunks": triton.cdiv(n, chunk),
            "dl_buffer_bytes": chunk * N * dl_elem, "dl_bytes_moved": 3 * n * N * dl_elem}  # fmt: skip
    for name, tiles, (m, c, d) in (("forward", fwd_tiles, fwd_tile), ("backward", bwd_tiles, bwd_tile)):
        plan[f"{name}_tiles"] = tiles
        plan[f"{name}_flops"] = tiles * 2 * m * c * d + (gemm_flops if name == "backward" else 0)
        plan[f"{name}_exponentials"] = tiles * m * c
        plan[f"{name}_tile_bytes"] = tiles * (m + c) * d * dtype.itemsize  # tile operands, mostly L2 hits
    return plan
