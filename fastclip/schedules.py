"""Learning-rate schedules: a linear warmup, then cosine decay, cosine with warm restarts (SGDR), or constant.

A schedule is the factor of ``optim.lr`` that the optimizer step ``k`` (counted from 0) uses; DeepSpeed's engine
steps it once per optimizer step as a ``LambdaLR``. Warmup is ``(k + 1) / warmup`` as open_clip's ``cosine_lr``,
so the first step already learns.

    cosine            f = m + (1 - m) * (1 + cos(pi * t / T)) / 2             T: the steps after warmup
    cosine_restarts   the same within cycle i of length c * mult**i, peak decay**i, restarting at the peak
    constant          f = 1
with t the steps since warmup ended and m = optim.min_lr_ratio (Loshchilov & Hutter, SGDR, 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastclip.errors import ConfigError

SCHEDULES = ("cosine", "cosine_restarts", "constant")


@dataclass(frozen=True)
class LrSchedule:
    kind: str
    warmup: int
    total: int  # optimizer steps in the run
    min_ratio: float = 0.0
    cycle: int = 0  # cosine_restarts: steps in the first cycle; 0 means a quarter of the steps after warmup
    mult: float = 1.0  # cosine_restarts: each cycle this many times longer than the one before
    decay: float = 1.0  # cosine_restarts: each cycle's peak this many times the one before

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t, span = step - self.warmup, max(self.total - self.warmup, 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            return self._cosine(min(t / span, 1.0), peak=1.0)
        length, peak = float(self.cycle or max(span // 4, 1)), 1.0
        while t >= length:  # cycles grow geometrically (or stay equal): a handful of iterations
            t, length, peak = t - length, length * self.mult, peak * self.decay
        return self._cosine(t / length, peak=peak)

    def _cosine(self, progress: float, *, peak: float) -> float:
        return peak * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def restart_at(scheduler, schedule: LrSchedule, *, base_lr: float, step: int) -> None:
    """Put a ``LambdaLR`` over ``schedule`` and its optimizer at optimizer step ``step`` with peak ``base_lr``.

    On resume the schedule comes from the run's config, not from the checkpoint: a saved ``LambdaLR`` state
    carries the old run's peak lr and its callable's fields (total steps among them), so a resume with a new
    ``optim.lr`` or ``train.steps`` would otherwise train on the old schedule (or at lr 0 past its end).
    """
    groups = scheduler.optimizer.param_groups
    lr = base_lr * schedule(step)
    scheduler.base_lrs = [base_lr] * len(groups)
    scheduler.last_epoch = step  # LambdaLR's count of optimizer steps taken; the next step uses schedule(step)
    for group in groups:
        group["initial_lr"], group["lr"] = base_lr, lr
    scheduler._last_lr = [lr] * len(groups)


def total_steps(
    samples_per_epoch: int, *, batch_size: int, grad_accum: int, world_size: int, steps: int, epochs: int
) -> tuple[int, int]:
    """(optimizer steps to run, optimizer steps per epoch): ``steps``, or ``epochs`` passes over the samples."""
    global_batch = batch_size * grad_accum * world_size
    per_epoch = samples_per_epoch // global_batch
    if per_epoch == 0:
        raise ConfigError(
            f"data.train_shards hold {samples_per_epoch} samples, fewer than one global batch of {global_batch} "
            f"(data.batch_size={batch_size} x train.grad_accum={grad_accum} x {world_size} ranks). "
            "Lower data.batch_size or add shards."
        )
    return steps or epochs * per_epoch, per_epoch
