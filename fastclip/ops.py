"""The fused contrastive op, registered with torch.library so that torch.compile can trace it.

``fastclip::contrastive_lse(q, k, scale, with_col, backend) -> (row_lse, col_lse)`` is the log-sum-exp over each row
(and, with ``with_col``, each column) of ``L = scale * q k^T``, without materializing L. Its backward is the
op ``fastclip::contrastive_lse_backward``. CPU tensors run the C++ kernel (csrc/, ``fastclip._C``); CUDA
tensors run the Triton kernels (kernels/, ``fastclip.kernels``). The contrastive loss built on it lives in
``fastclip.loss``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastclip.config import BACKENDS, LOGITS_BACKENDS


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


# Each op takes its kernel by the name loss.backend gives it, as its argument ``backend``: "auto" is the device's own
# (C++ on CPU, Triton on CUDA); "cpp" and "triton" name one whatever the device (Triton on CPU tensors runs under
# TRITON_INTERPRET=1, for tests). Named or not, the call goes through the registered op, so opcheck, the fake kernel
# and torch.compile cover what users run. (Not ``kernel``: inductor's fallback for custom ops has an argument of
# that name, and an op argument called so broke torch.compile's lowering.)
KERNELS = tuple(b for b in BACKENDS if b not in LOGITS_BACKENDS)  # auto, cpp, triton: the fused ones


def _cpu_kernel(backend: str):
    if backend not in KERNELS:
        raise ValueError(f"contrastive_lse: backend must be one of {', '.join(KERNELS)}, got {backend!r}")
    return _triton() if backend == "triton" else _cpp()


def _cuda_kernel(backend: str):
    if backend == "cpp":
        raise ValueError("contrastive_lse: the C++ kernel runs on CPU tensors; these are on CUDA (use 'auto')")
    if backend not in KERNELS:
        raise ValueError(f"contrastive_lse: backend must be one of {', '.join(KERNELS)}, got {backend!r}")
    return _triton()


def _host_scale(scale: Tensor, backend: str) -> Tensor | float:
    """The C++ kernel takes the scale as a host float (a CPU tensor: reading it is no device sync); Triton takes
    the tensor, so that a CUDA scale never leaves the device."""
    return scale if backend == "triton" else float(scale)


@torch.library.custom_op("fastclip::contrastive_lse", mutates_args=(), device_types="cpu")
def contrastive_lse(
    q: Tensor, k: Tensor, scale: Tensor, with_col: bool, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    _check_scale(scale)
    return _cpu_kernel(backend).lse_forward(q, k, _host_scale(scale, backend), with_col)


@contrastive_lse.register_kernel("cuda")
def _(q: Tensor, k: Tensor, scale: Tensor, with_col: bool, backend: str = "auto") -> tuple[Tensor, Tensor]:
    _check_scale(scale)
    return _cuda_kernel(backend).lse_forward(q, k, scale, with_col)  # scale stays on the device: no host sync


@contrastive_lse.register_fake
def _(q: Tensor, k: Tensor, scale: Tensor, with_col: bool, backend: str = "auto") -> tuple[Tensor, Tensor]:
    row = q.new_empty(q.shape[0], dtype=torch.float32)
    col = q.new_empty(k.shape[0] if with_col else 0, dtype=torch.float32)
    return row, col


@torch.library.custom_op("fastclip::contrastive_lse_backward", mutates_args=(), device_types="cpu")
def contrastive_lse_backward(
    q: Tensor, k: Tensor, scale: Tensor, row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor,
    backend: str = "auto",
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    dq, dk, ds = _cpu_kernel(backend).lse_backward(
        q,
        k,
        _host_scale(scale, backend),
        row_lse,
        col_lse,
        grad_row.float().contiguous(),
        grad_col.float().contiguous(),
    )
    return dq, dk, ds.reshape(scale.shape).to(scale.dtype)


@contrastive_lse_backward.register_kernel("cuda")
def _(q, k, scale, row_lse, col_lse, grad_row, grad_col, backend="auto"):
    dq, dk, ds = _cuda_kernel(backend).lse_backward(q, k, scale, row_lse, col_lse, grad_row, grad_col)
    return dq, dk, ds.reshape(scale.shape).to(scale.dtype)


@contrastive_lse_backward.register_fake
def _(q, k, scale, row_lse, col_lse, grad_row, grad_col, backend="auto"):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(scale)


def _setup_context(ctx, inputs, output):
    q, k, scale, with_col, backend = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(q, k, scale, row_lse, col_lse)
    ctx.with_col, ctx.backend = with_col, backend


def _backward(ctx, grad_row, grad_col):
    q, k, scale, row_lse, col_lse = ctx.saved_tensors
    grad_row = grad_row if grad_row is not None else _empty_f32(q)
    grad_col = grad_col if (grad_col is not None and ctx.with_col) else _empty_f32(q)
    dq, dk, ds = contrastive_lse_backward(q, k, scale, row_lse, col_lse, grad_row, grad_col, ctx.backend)
    return dq, dk, ds, None, None


contrastive_lse.register_autograd(_backward, setup_context=_setup_context)


def _check_scale(scale: Tensor) -> None:
    if scale.numel() != 1:
        raise ValueError(f"contrastive_lse: scale must hold one value, got shape {tuple(scale.shape)}")


def lse(q: Tensor, k: Tensor, scale: Tensor, with_col: bool, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Row (and column) LSE of ``scale * q k^T`` through the registered op; ``backend`` names its kernel."""
    if backend not in KERNELS:
        raise ValueError(f"lse: backend must be 'auto', 'cpp' or 'triton', got {backend!r}")
    return contrastive_lse(q, k, scale, with_col, backend)


# ---- the sigmoid (SigLIP) loss: fastclip::sigmoid_loss ------------------------------------------------------------
# ``fastclip::sigmoid_loss(q, k, scale, bias, offset, with_grad, backend) -> (loss_sum, dq, dk, dscale_dbias)``:
# loss_sum = sum_ij softplus(-y_ij (scale q_i . k_j + bias)), y = +1 at j = i + offset (none when offset >= N), -1
# elsewhere. The loss is a scalar, so with ``with_grad`` the kernel returns the gradient of loss_sum from the same
# pass over the logits (3 GEMMs instead of a forward and a recomputing backward's 4), and the backward scales it.
# The other three outputs are that saved gradient (fp32; 1-element placeholders without grad), not results to
# differentiate.


def _sigmoid_kernel(q: Tensor, backend: str):
    if backend not in KERNELS:
        raise ValueError(f"sigmoid_loss: backend must be one of {', '.join(KERNELS)}, got {backend!r}")
    if q.device.type == "cuda" and backend == "cpp":
        raise ValueError("sigmoid_loss: the C++ kernel runs on CPU tensors; these are on CUDA (use 'auto')")
    if backend == "triton" or q.device.type == "cuda":
        from fastclip.kernels import sigmoid_loss as triton_sigmoid

        return triton_sigmoid.sigmoid_forward
    return lambda q, k, s, b, offset, with_grad: _cpp().sigmoid_forward(q, k, float(s), float(b), offset, with_grad)


@torch.library.custom_op("fastclip::sigmoid_loss", mutates_args=(), device_types=("cpu", "cuda"))
def sigmoid_loss_op(
    q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, offset: int, with_grad: bool, backend: str = "auto"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    for name, t in (("scale", scale), ("bias", bias)):
        if t.numel() != 1:
            raise ValueError(f"sigmoid_loss: {name} must hold one value, got shape {tuple(t.shape)}")
    # C++ reads scale and bias as host floats (CPU tensors: no sync); Triton takes the tensors (CUDA: none either)
    return _sigmoid_kernel(q, backend)(q, k, scale, bias, offset, with_grad)


@sigmoid_loss_op.register_fake
def _(q, k, scale, bias, offset, with_grad, backend="auto"):
    def grad(*shape):
        return q.new_empty(shape if with_grad else (1,), dtype=torch.float32)

    return q.new_empty((), dtype=torch.float32), grad(*q.shape), grad(*k.shape), grad(2)


def _sigmoid_setup_context(ctx, inputs, output):
    q, k, scale, bias, _offset, with_grad, _backend = inputs
    _loss, dq, dk, dsb = output
    ctx.save_for_backward(dq, dk, dsb)
    ctx.with_grad = with_grad
    ctx.like = [(t.dtype, t.shape) for t in (q, k, scale, bias)]


def _sigmoid_backward(ctx, grad, _dq, _dk, _dsb):
    if not ctx.with_grad:
        raise RuntimeError("sigmoid_loss: backward through a call made with with_grad=False (use sigmoid_pair_loss)")
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        # the saved gradient is a constant here: a graph of it would give zero second derivatives, silently
        raise RuntimeError(
            "sigmoid_loss: second-order gradients (create_graph=True) are not supported by the fused op; use "
            "SigLipLoss(backend='torch') (loss.backend torch)"
        )
    dq, dk, dsb = ctx.saved_tensors
    grads = (dq, dk, dsb[0], dsb[1])
    return *((grad * g).reshape(shape).to(dtype) for g, (dtype, shape) in zip(grads, ctx.like)), None, None, None


sigmoid_loss_op.register_autograd(_sigmoid_backward, setup_context=_sigmoid_setup_context)


def sigmoid_pair_loss(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, offset: int, backend: str = "auto") -> Tensor:
    """sum_ij softplus(-y_ij (scale q_i . k_j + bias)) through the registered op (fp32 scalar). Its gradient is
    computed in the same pass when autograd will ask for it."""
    if backend not in KERNELS:
        raise ValueError(f"sigmoid_pair_loss: backend must be 'auto', 'cpp' or 'triton', got {backend!r}")
    if offset < 0:
        raise ValueError(f"sigmoid_pair_loss: offset must be >= 0 (k.shape[0] or more: no positives), got {offset}")
    with_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, scale, bias))
    return sigmoid_loss_op(q.contiguous(), k.contiguous(), scale, bias, offset, with_grad, backend)[0]


def _tag_compile_cache() -> None:
    """Make these ops' schemas part of torch.compile's cache key. Inductor keys a cached graph on the graph, not on
    the schemas of the custom ops it calls: after an upgrade that renamed an op's argument (``impl`` became
    ``backend``), a graph cached by the older fastclip was reused and failed with "Unknown keyword argument"."""
    import hashlib

    schemas = [str(op._schema) for op in (contrastive_lse._opoverload, contrastive_lse_backward._opoverload,
                                          sigmoid_loss_op._opoverload)]  # fmt: skip
    tag = "fastclip-ops-" + hashlib.sha1("\n".join(schemas).encode()).hexdigest()[:12]
    config = torch.compiler.config
    if not isinstance(getattr(config, "cache_key_tag", None), str):  # a torch without it: nothing to key
        return
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag} {tag}".strip()


_tag_compile_cache()
