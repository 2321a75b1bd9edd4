"""Collectives: the all-gather whose backward reduce-scatters (gather with grad), the neighbour exchange whose
backward sends gradients back (SigLIP's ring), and any-rank flags. How a process joins the world is fastclip/world.py's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.14 deprecates all_gather_into_tensor for all_gather_single; older releases may have only the former
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all-gather along dim 0. Backward: sum the gradients of every rank, keep this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(out, tensor.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        local = grad.new_empty((grad.shape[0] // world, *grad.shape[1:]))
        if dist.get_backend(ctx.group) == "nccl":
            dist.reduce_scatter_tensor(local, grad, group=ctx.group)
        else:  # gloo has no reduce-scatter: all-reduce, then keep this rank's block
            dist.all_reduce(grad, group=ctx.group)
            local.copy_(grad.chunk(world)[dist.get_rank(ctx.group)])
        return local, None


def all_gather_with_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """``cat`` of every rank's ``tensor`` (same shape on all ranks) along dim 0, differentiable."""
    return _GatherWithGrad.apply(tensor, group)


class _ExchangeWithGrad(torch.autograd.Function):
    """Forward: send ``tensor`` to ``send_to`` and receive a tensor of its shape from ``recv_from``. Backward: the
    received tensor's gradient goes back to where it came from, and ours comes back from where we sent it."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, send_to: int, recv_from: int, group) -> torch.Tensor:
        ctx.send_to, ctx.recv_from, ctx.group = send_to, recv_from, group
        return _send_recv(tensor, send_to, recv_from, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _send_recv(grad, ctx.recv_from, ctx.send_to, ctx.group), None, None, None


def _send_recv(tensor: torch.Tensor, send_to: int, recv_from: int, group) -> torch.Tensor:
    tensor = tensor.contiguous()
    out = torch.empty_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor, send_to, group), dist.P2POp(dist.irecv, out, recv_from, group)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return out


def exchange_with_grad(tensor: torch.Tensor, *, send_to: int, recv_from: int, group=None) -> torch.Tensor:
    """A neighbour exchange (every rank sends and receives one tensor of one shape), differentiable."""
    return _ExchangeWithGrad.apply(tensor, send_to, recv_from, group)


def all_gather_no_grad(tensor: torch.Tensor, group=None) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    _all_gather_single(out, tensor.detach().contiguous(), group=group)
    return out


def any_rank(flag: torch.Tensor) -> bool:
    """True when ``flag`` (a 0-dim bool tensor) is true on any rank; every rank gets the same answer."""
    flag = flag.to(torch.float32)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())  # note: host sync, at checkpoint and export time only
