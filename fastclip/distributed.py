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
    """Forward: send each tensor to its rank in ``send_to`` and receive one of the same shape from the matching rank
    in ``recv_from``, all in one batch of point-to-point operations. Backward: each received tensor's gradient goes
    back where it came from, and each sent one's comes back from where it went, again in one batch (so every rank
    posts the same operations in the same call, whatever order autograd runs its nodes in)."""

    @staticmethod
    def forward(ctx, send_to: tuple[int, ...], recv_from: tuple[int, ...], group, *tensors: torch.Tensor):
        ctx.send_to, ctx.recv_from, ctx.group = send_to, recv_from, group
        return _send_recv(tensors, send_to, recv_from, group)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return None, None, None, *_send_recv(grads, ctx.recv_from, ctx.send_to, ctx.group)


def _send_recv(tensors, send_to, recv_from, group) -> tuple[torch.Tensor, ...]:
    tensors = [t.contiguous() for t in tensors]
    outs = tuple(torch.empty_like(t) for t in tensors)
    ops = [dist.P2POp(dist.isend, t, dst, group) for t, dst in zip(tensors, send_to)]
    ops += [dist.P2POp(dist.irecv, out, src, group) for out, src in zip(outs, recv_from)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return outs


def exchange_with_grad(*tensors: torch.Tensor, send_to: tuple[int, ...], recv_from: tuple[int, ...], group=None):
    """A neighbour exchange, differentiable: ``tensors[i]`` goes to rank ``send_to[i]`` and the i-th result comes
    from rank ``recv_from[i]`` (every rank sends and receives tensors of the same shapes)."""
    return _ExchangeWithGrad.apply(tuple(send_to), tuple(recv_from), group, *tensors)


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
