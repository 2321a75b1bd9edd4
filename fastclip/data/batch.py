"""The batch every loader yields to the training step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DataPosition:
    """Where a rank's train stream stands after a batch: the reader's checkpoint before the read that held the
    batch's last sample, and how many samples of that read the batch consumed. Restoring it replays the same
    samples in the same order (random crops are drawn afresh). Near a skipped corrupt image the loader decodes
    the batch around it a little out of read order, so a checkpoint taken there may replay or miss up to one
    batch of samples."""

    reader: bytes  # DALI's pipeline checkpoint
    consumed: int


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W], normalized, on the step's device
    texts: torch.Tensor  # [B, context_length] token ids (int64)
    labels: torch.Tensor | None = None  # [B] class index from KEY.cls, -1 where absent (val only)
    position: DataPosition | None = None  # the stream's position after this batch (loaders that can resume)
