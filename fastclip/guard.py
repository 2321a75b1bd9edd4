"""What stops a run whose numbers stopped being finite, before anything is saved from that state.

Without ``optim.skip_nonfinite``, a non-finite mean loss or grad norm at a logging step (or in the steps before a
checkpoint) ends the run: the weights may hold inf/NaN by then, so nothing is saved, and the newest checkpoint is
named for a resume with a lower lr. With it, DeepSpeed skips steps whose gradients are not finite (its check
synchronizes the host once a step); then ``optim.max_skipped_steps`` skipped in a row end the run, since the model
is not learning, and weights that are not finite are never saved or exported.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch

from fastclip.config import OptimConfig
from fastclip.distributed import any_rank
from fastclip.errors import TrainingDiverged


class NonFiniteGuard:
    def __init__(self, optim: OptimConfig, *, latest: Callable[[], Path | None]):
        self.skipping, self.limit = optim.skip_nonfinite, optim.max_skipped_steps
        self.latest = latest  # the newest checkpoint, named in the message
        self.skipped_in_a_row, self.skipped_before = 0, 0

    def stop(self, step: int, what: str) -> None:
        """Raise :class:`TrainingDiverged` for ``what`` at ``step``, with the advice that fits."""
        if self.skipping:  # skipping did not help: the NaN is in the weights or comes every step
            advice = "Check --model.pretrained and the data, or resume from it with a lower --optim.lr."
        else:
            advice = (
                "Resume from it with --checkpoint.resume latest and a lower --optim.lr (or more --optim.warmup_steps), "
                "or add --optim.skip_nonfinite true to skip steps whose gradients are not finite (DeepSpeed's check, "
                "one host sync per step)."
            )
        raise TrainingDiverged(
            f"training diverged at step {step}: {what}. The weights may hold inf/NaN now, so nothing was saved; "
            f"the newest checkpoint ({self.latest() or 'none yet'}) is untouched. {advice}"
        )

    def after_step(self, step: int, skipped: int) -> None:
        """With skipping on, DeepSpeed's count of skipped steps after ``step`` (a host int: its own check already
        synchronized this step); too many in a row stop the run."""
        if not self.skipping:
            return
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped > self.skipped_before else 0
        self.skipped_before = skipped
        if self.skipped_in_a_row >= self.limit:
            self.stop(
                step,
                f"steps {step - self.limit + 1}-{step} were all skipped because their gradients were not finite "
                f"(optim.max_skipped_steps={self.limit}; {skipped} skipped in all)",
            )

    def check_logged(self, step: int, loss: float, grad_norm: float | None) -> None:
        """A logging step's means: not finite ends the run, unless DeepSpeed skips such steps."""
        if self.skipping or (math.isfinite(loss) and math.isfinite(grad_norm or 0.0)):
            return
        self.stop(step, f"mean loss {loss}, mean grad norm {grad_norm} since the last log")

    def check_before_save(self, step: int, pending: torch.Tensor, module: torch.nn.Module) -> None:
        """Before a checkpoint: the loss and grad norm totals since the last log (``pending``) must be finite, and,
        when steps are skipped, the weights too (every rank decides alike)."""
        if any_rank((~torch.isfinite(pending)).any()) and not self.skipping:
            self.stop(step, "the loss or grad norm since the last log step is not finite")
        if self.skipping and (name := first_nonfinite_weight(module)):
            self.stop(step, f"the weights hold non-finite values ({name})")


def first_nonfinite_weight(module: torch.nn.Module) -> str | None:
    """The name of a parameter holding inf/NaN on some rank (this rank's partition under ZeRO-3), else None."""
    named = list(module.named_parameters())
    local = [getattr(p, "ds_tensor", p) for _, p in named]  # ZeRO-3: the module holds empty placeholders
    bad = torch.stack([~torch.isfinite(t).all() for t in local])
    if not any_rank(bad.any()):
        return None
    return next((name for (name, _), b in zip(named, bad.tolist()) if b), "a parameter on another rank")
