"""Learning-rate schedules: a linear warmup, then cosine decay, cosine with warm restarts (SGDR), constant, or
constant with a cooldown.

A schedule is the factor of ``optim.lr`` that the optimizer step ``k`` (counted from 0) uses; DeepSpeed's engine
steps it once per optimizer step as a ``LambdaLR``. Warmup is ``(k + 1) / warmup`` as open_clip's ``cosine_lr``,
so the first step already learns.

    cosine            f = m + (1 - m) * (1 + cos(pi * t / T)) / 2             T: the steps after warmup
    cosine_restarts   the same within cycle i of length c * mult**i, peak decay**i, restarting at the peak
    constant          f = 1
    const_cooldown    f = 1, then over the last C steps f = e + (1 - e) * (1 - u / C) ** p      (open_clip's
                      const-cooldown: u the steps since the cooldown began, e = cooldown_end_lr / lr, p the power)
with t the steps since warmup ended and m = optim.min_lr_ratio (Loshchilov & Hutter, SGDR, 2017).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastclip.errors import ConfigError

SCHEDULES = ("cosine", "cosine_restarts", "constant", "const_cooldown")


@dataclass(frozen=True)
class LrSchedule:
    kind: str
    warmup: int
    total: int  # optimizer steps in the run
    min_ratio: float = 0.0
    cycle: int = 0  # cosine_restarts: steps in the first cycle; 0 means a quarter of the steps after warmup
    mult: float = 1.0  # cosine_restarts: each cycle this many times longer than the one before
    decay: float = 1.0  # cosine_restarts: each cycle's peak this many times the one before
    cooldown: int = 0  # const_cooldown: the last steps, decaying to end_ratio
    end_ratio: float = 0.0  # const_cooldown: the factor at the end of the cooldown
    power: float = 1.0  # const_cooldown: 1 decays linearly, 2 quadratically, ...

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t, span = step - self.warmup, max(self.total - self.warmup, 1)
        if self.kind == "constant":
            return 1.0
        if self.kind == "const_cooldown":
            start = self.total - self.cooldown
            if step < start:
                return 1.0
            left = max(1.0 - (step - start) / self.cooldown, 0.0)
            return self.end_ratio + (1.0 - self.end_ratio) * left**self.power
        if self.kind == "cosine":
            return self._cosine(min(t / span, 1.0), peak=1.0)
        length, peak = float(self.cycle or max(span // 4, 1)), 1.0
        while t >= length:  # cycles grow geometrically (or stay equal): a handful of iterations
            t, length, peak = t - length, length * self.mult, peak * self.decay
        return self._cosine(t / length, peak=peak)

    def _cosine(self, progress: float, *, peak: float) -> float:
        return peak * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_schedule(optim, train, *, total: int, steps_per_epoch: int) -> LrSchedule:
    """The run's learning-rate multipliers from ``optim`` (and ``train``, for a cooldown given in epochs)."""
    return LrSchedule(
        kind=optim.schedule, warmup=optim.warmup_steps, total=total, min_ratio=optim.min_lr_ratio,
        cycle=optim.restart_steps, mult=optim.restart_mult, decay=optim.restart_decay,
        cooldown=cooldown_steps(optim, train, total=total, steps_per_epoch=steps_per_epoch),
        end_ratio=optim.cooldown_end_lr / optim.lr, power=optim.cooldown_power,
    )  # fmt: skip


def restart_at(scheduler, schedule: LrSchedule, *, base_lr: float, step: int, where: str) -> None:
    """Put a ``LambdaLR`` over ``schedule`` and its optimizer at optimizer step ``step`` with peak ``base_lr``, for
    a resume from checkpoint ``where``.

    On resume the schedule comes from the run's config, not from the checkpoint: a saved ``LambdaLR`` state
    carries the old run's peak lr and its callable's fields (total steps among them), so a resume with a new
    ``optim.lr`` or ``train.steps`` would otherwise train on the old schedule (or at lr 0 past its end). Every
    schedule gives a positive lr before its last step, so the one resume that cannot learn is one with no step
    left: refused.
    """
    if step >= schedule.total:
        raise ConfigError(
            f"checkpoint.resume: {where!r} is at step {step} and this run ends at step {schedule.total} "
            "(train.steps, or train.epochs): nothing is left to train. Raise --train.steps to train further."
        )
    groups = scheduler.optimizer.param_groups
    lr = base_lr * schedule(step)
    scheduler.base_lrs = [base_lr] * len(groups)
    scheduler.last_epoch = step  # LambdaLR's count of optimizer steps taken; the next step uses schedule(step)
    for group in groups:
        group["initial_lr"], group["lr"] = base_lr, lr
    scheduler._last_lr = [lr] * len(groups)


def run_length(train, *, total: int, steps_per_epoch: int) -> str:
    """How the run's ``total`` steps came about, in the fields a user sets: 'train.steps=10' or
    'train.epochs=3 of 5 steps'."""
    return f"train.steps={train.steps}" if train.steps else f"train.epochs={train.epochs} of {steps_per_epoch} steps"


def cooldown_steps(optim, train, *, total: int, steps_per_epoch: int) -> int:
    """const_cooldown's length in optimizer steps (``optim.cooldown_steps``, else ``cooldown_epochs`` epochs); 0 for
    the other schedules. A cooldown that does not fit after the warmup is a ConfigError naming the fields."""
    if optim.schedule != "const_cooldown":
        return 0
    steps = optim.cooldown_steps or round(optim.cooldown_epochs * steps_per_epoch)
    room = total - optim.warmup_steps
    if 0 < steps <= room:
        return steps
    given = (
        f"optim.cooldown_steps={optim.cooldown_steps}"
        if optim.cooldown_steps
        else f"optim.cooldown_epochs={optim.cooldown_epochs} ({steps} steps at {steps_per_epoch} an epoch)"
    )
    if steps < 1:
        raise ConfigError(f"{given}: const_cooldown's cooldown must be 1 step at least; lengthen it")
    run = f"the run's {total} steps ({run_length(train, total=total, steps_per_epoch=steps_per_epoch)})"
    if room > 0:
        fix = f"make the cooldown {room} steps at most, or lengthen the run"
    elif total > steps:  # warmup alone fills the run: a bound of "1 to -40 steps" said nothing
        fix = f"lower optim.warmup_steps to {total - steps} at most, or lengthen the run"
    else:
        fix = "lengthen the run, or shorten the cooldown and optim.warmup_steps"
    raise ConfigError(f"{given}: the cooldown and optim.warmup_steps={optim.warmup_steps} must fit in {run} "
                      f"together, and their {steps + optim.warmup_steps} steps do not; {fix}")  # fmt: skip


def total_steps(
    samples_per_epoch: int, *, batch_size: int, grad_accum: int, world_size: int, steps: int, epochs: int,
    counted_from: str = "data.train_shards",
) -> tuple[int, int]:  # fmt: skip
    """(optimizer steps to run, optimizer steps per epoch): ``steps``, or ``epochs`` passes over the samples. An epoch
    that holds no step is a ConfigError; ``counted_from`` says where its count came from."""
    global_batch = batch_size * grad_accum * world_size
    per_epoch = samples_per_epoch // global_batch
    if per_epoch == 0:
        raise ConfigError(_no_step(samples_per_epoch, batch_size=batch_size, grad_accum=grad_accum,
                                   world_size=world_size, counted_from=counted_from))  # fmt: skip
    return steps or epochs * per_epoch, per_epoch


def _no_step(samples: int, *, batch_size: int, grad_accum: int, world_size: int, counted_from: str) -> str:
    """Why an epoch holds no optimizer step, led by the field to change, with the largest value that fits."""
    most = samples // world_size  # the samples a rank's share of an epoch holds
    if grad_accum > 1 and batch_size <= most:  # a micro batch fits: too many of them to a step
        lead, fix = f"train.grad_accum={grad_accum}", f"set it to {most // batch_size} at most, or add samples"
    elif grad_accum <= most:
        lead, fix = f"data.batch_size={batch_size}", f"lower it to {most // grad_accum} at most, or add samples"
    else:
        lead = f"data.batch_size={batch_size} and train.grad_accum={grad_accum}"
        fix = f"make their product {most} at most, or add samples" if most else f"add samples: {world_size} ranks"
    return (f"{lead}: an epoch holds {samples:,} samples ({counted_from}), fewer than one optimizer step's "
            f"{batch_size * grad_accum * world_size:,} (data.batch_size={batch_size} x train.grad_accum={grad_accum} "
            f"x {world_size} ranks), and every epoch must hold a step; {fix}")  # fmt: skip


def epoch_source(epoch_from: str) -> str:
    """Where an epoch's count came from, for a message: a loader's ``epoch_from`` ('their tar headers (4 shards)')
    with the field it counts."""
    return epoch_from if epoch_from.startswith("data.") else f"data.train_shards, counted from {epoch_from}"


def check_run_length(cfg, *, samples_per_epoch: int | None, world_size: int, counted_from: str) -> None:
    """What must fit in the run, checked before any model is built: a step in an epoch (:func:`total_steps`) and
    const_cooldown's cooldown after the warmup. ``samples_per_epoch`` None (only the loader counts them): a cooldown
    in steps against ``train.steps`` alone; the trainer checks the rest once its loader has counted. ``counted_from``:
    the count's source, as :func:`epoch_source` says it."""
    train, optim = cfg.train, cfg.optim
    if samples_per_epoch is not None:
        total, per_epoch = total_steps(
            samples_per_epoch, batch_size=cfg.data.batch_size, grad_accum=train.grad_accum, world_size=world_size,
            steps=train.steps, epochs=train.epochs, counted_from=counted_from,
        )  # fmt: skip
        cooldown_steps(optim, train, total=total, steps_per_epoch=per_epoch)
    elif train.steps and optim.cooldown_steps:
        cooldown_steps(optim, train, total=train.steps, steps_per_epoch=0)
