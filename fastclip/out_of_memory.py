"""An out-of-memory error in a training step, said in one line: the batch that did not fit and what to lower
(the micro batch, the step's accumulation, a loss backend that holds the N x N logits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from fastclip.config import LOGITS_BACKENDS, Config
from fastclip.errors import OutOfMemory


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA allocation failure, or the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )


@contextlib.contextmanager
def said_in_one_line(cfg: Config, *, world_size: int, contrastive_batch: int, contrastive: bool) -> Iterator[None]:
    """Turn an allocation failure inside into :class:`~fastclip.errors.OutOfMemory` with :func:`message`'s line."""
    try:
        yield
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        raise OutOfMemory(message(cfg, e, world_size=world_size, contrastive_batch=contrastive_batch,
                                  contrastive=contrastive)) from e  # fmt: skip


def message(cfg: Config, error: Exception, *, world_size: int, contrastive_batch: int, contrastive: bool) -> str:
    micro, k = cfg.data.batch_size, cfg.train.grad_accum
    first = " ".join(str(error).split())[:200]
    logits = ""
    if cfg.loss.backend in LOGITS_BACKENDS:
        logits = f"; loss.backend {cfg.loss.backend} holds the N x N logits, loss.backend auto does not"
    if contrastive:
        return (
            f"out of memory in a step with a contrastive batch of {contrastive_batch} ({k} micro batches "
            f"of {micro} per rank x {world_size} ranks): lower data.batch_size (the activations of "
            f"one micro batch) or train.grad_accum (the inputs held for the replay){logits}. ({first})"
        )
    return (
        f"out of memory in a step with a micro batch of {micro} per rank: lower data.batch_size; "
        f"train.grad_accum keeps the step's batch with smaller micro batches{logits}. ({first})"
    )
