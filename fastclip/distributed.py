"""Process-group helpers and the all-gather whose backward reduce-scatters (gather with grad)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastclip.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port nothing listens on now: the kernel's pick for a bind to port 0."""
    # the wildcard address, as the rendezvous store listens on it: a port taken on any interface is not free
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _address_in_use(error: BaseException) -> bool:
    text = str(error).lower()
    return "eaddrinuse" in text or "address already in use" in text


def init_distributed() -> World:
    """Join the process group the launcher describes (deepspeed, torchrun), or run as one rank under python."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `python -m fastclip.train`: a world of one, no MPI discovery
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        # a port derived from the pid collided with jobs already running; a free one cannot
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    try:
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    except RuntimeError as e:  # torch's DistNetworkError is one
        if not _address_in_use(e):
            raise
        port = os.environ.get("MASTER_PORT")
        raise ConfigError(
            f"MASTER_PORT {port} is already in use (another job?): pick a free port, with --master_port for the "
            "deepspeed launcher or MASTER_PORT=<port> in the environment for torchrun and python"
        ) from e
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    return World(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def close_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
