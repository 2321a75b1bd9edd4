"""The fused contrastive op, registered with torch.library so that torch.compile can trace it.

``fastclip::contrastive_lse(q, k, scale, with_col) -> (row_lse, col_lse)`` is the log-sum-exp over each row
(and, with ``with_col``, each column) of ``L = scale * q k^T``, without materializing L. Its backward is the
op ``fastclip::contrastive_lse_backward``. CPU tensors run the C++ kernel (csrc/, ``fastclip._C``); CUDA
tensors run the Triton kernels (kernels/, ``fastclip.kernels``). The contrastive loss built on it lives in
``fastclip.loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _cpp():
    try:
        from fastclip import _C
    except ImportError as e:
        raise RuntimeError(
            "fastclip's C++ extension (fastclip._C) is not built: run `pip install --no-build-isolation -e .` "
            "in the repository (make setup does it), or use loss.backend=torch"
        ) from e
    return _C


def _triton():
    from fastclip.kernels import contrastive_lse

    return contrastive_lse


def _empty_f32(like: Tensor) -> Tensor:
    return torch.empty(0, device=like.device, dtype=torch.float32)


@torch.library.custom_op("fastclip::contrastive_lse", mutates_args=(), device_types="cpu")
def contrastive_lse(q: Tensor, k: Tensor, scale: Tensor, with_col: bool) -> tuple[Tensor, Tensor]:
    _check_scale(scale)
    return _cpp().lse_forward(q, k, float(scale), with_col)  # CPU tensor: reading it is not a device sync


@contrastive_lse.register_kernel("cuda")
def _(q: Tensor, k: Tensor, scale: Tensor, with_col: bool) -> tuple[Tensor, Tensor]:
    _check_scale(scale)
    return _triton().lse_forward(q, k, scale, with_col)  # scale stays on the device: no host sync


@contrastive_lse.register_fake
def _(q: Tensor, k: Tensor, scale: Tensor, with_col: bool) -> tuple[Tensor, Tensor]:
    row = q.new_empty(q.shape[0], dtype=torch.float32)
    col = q.new_empty(k.shape[0] if with_col else 0, dtype=torch.float32)
    return row, col


@torch.library.custom_op("fastclip::contrastive_lse_backward", mutates_args=(), device_types="cpu")
def contrastive_lse_backward(
    q: Tensor, k: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, ds = _cpp().lse_backward(
        q, k, float(scale), row_lse, col_lse, grad_row.float().contiguous(), grad_col.float().contiguous()
    )
    return dq, dk, ds.reshape(scale.shape).to(scale.dtype)


@contrastive_lse_backward.register_kernel("cuda")
def _(q, k, scale, row_lse, col_lse, grad_row, grad_col):
    dq, dk, ds = _triton().lse_backward(q, k, scale, row_lse, col_lse, grad_row, grad_col)
    return dq, dk, ds.reshape(scale.shape).to(scale.dtype)


@contrastive_lse_backward.register_fake
def _(q, k, scale, row_lse, col_lse, grad_row, grad_col):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    q, k, scale, with_col = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(q, k, scale, row_lse, col_lse)
    ctx.with_col = with_col


def _backward(ctx, grad_row, grad_col):
    q, k, scale, row_lse, col_lse = ctx.saved_tensors
    grad_row = grad_row if grad_row is not None else _empty_f32(q)
    grad_col = grad_col if (grad_col is not None and ctx.with_col) else _empty_f32(q)
    dq, dk, ds = contrastive_lse_backward(q, k, scale, row_lse, col_lse, grad_row, grad_col)
    return dq, dk, ds, None


contrastive_lse.register_autograd(_backward, setup_context=_setup_context)


def _check_scale(scale: Tensor) -> None:
    if scale.numel() != 1:
        raise ValueError(f"contrastive_lse: scale must hold one value, got shape {tuple(scale.shape)}")


def contrastive_lse_reference(q: Tensor, k: Tensor, scale: Tensor, with_col: bool) -> tuple[Tensor, Tensor]:
    """The same values with the N x N logits materialized (float64 when given float64): for tests."""
    logits = scale * q @ k.T
    row = torch.logsumexp(logits, dim=1)
    col = torch.logsumexp(logits, dim=0) if with_col else logits.new_empty(0)
    return row, col


class _DirectLSE(torch.autograd.Function):
    """contrastive_lse through one named backend, bypassing device dispatch (tests, TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, q, k, scale, with_col, backend):
        fwd = _cpp().lse_forward if backend == "cpp" else _triton().lse_forward
        s = float(scale) if backend == "cpp" else scale
        row, col = fwd(q, k, s, with_col)
        ctx.save_for_backward(q, k, scale, row, col)
        ctx.with_col, ctx.backend = with_col, backend
        return row, col

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        q, k, scale, row, col = ctx.saved_tensors
        grad_row = grad_row.float().contiguous() if grad_row is not None else _empty_f32(q)
        grad_col = grad_col.float().contiguous() if grad_col is not None and ctx.with_col else _empty_f32(q)
        if ctx.backend == "cpp":
            dq, dk, ds = _cpp().lse_backward(q, k, float(scale), row, col, grad_row, grad_col)
        else:
            dq, dk, ds = _triton().lse_backward(q, k, scale, row, col, grad_row, grad_col)
        return dq, dk, ds.reshape(scale.shape).to(scale.dtype), None, None


def lse(q: Tensor, k: Tensor, scale: Tensor, with_col: bool, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Row (and column) LSE of ``scale * q k^T``. ``auto``: the registered op (CPU -> C++, CUDA -> Triton);
    ``cpp`` / ``triton``: that kernel whatever the device (Triton on CPU needs TRITON_INTERPRET=1)."""
    if backend == "auto":
        return contrastive_lse(q, k, scale, with_col)
    if backend not in ("cpp", "triton"):
        raise ValueError(f"lse: backend must be 'auto', 'cpp' or 'triton', got {backend!r}")
    return _DirectLSE.apply(q, k, scale, with_col, backend)
