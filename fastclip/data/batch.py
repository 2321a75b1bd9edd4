"""The batch every loader yields to the training step."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W], normalized, on the step's device
    texts: torch.Tensor  # [B, context_length] token ids (int64)
    labels: torch.Tensor | None = None  # [B] class index from KEY.cls, -1 where absent (val only)
