"""Learning-rate schedules (against open_clip's own) and early stopping, alone and inside the trainer."""

import gc
import json
import math
import sys
import weakref

import pytest
import torch

from fastclip.cli import parse_args
from fastclip.errors import ConfigError
from fastclip.eval import EarlyStopping
from fastclip.preflight import check_inputs
from fastclip.schedules import LrSchedule

from runs import ROOT, run_cli, small_run_args


@pytest.mark.parametrize("kind", ["cosine", "constant"])
def test_schedules_match_open_clip(kind):
    from open_clip_train.scheduler import const_lr, cosine_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    theirs = (cosine_lr if kind == "cosine" else const_lr)(opt, 3e-4, 25, 400)
    ours = LrSchedule(kind=kind, warmup=25, total=400)
    for step in range(400):
        assert 3e-4 * ours(step) == pytest.approx(theirs(step), rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("power, end", [(1.0, 0.0), (2.0, 3e-5), (0.5, 1e-5)])
def test_const_cooldown_matches_open_clip(power, end):
    from open_clip_train.scheduler import const_lr_cooldown

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    theirs = const_lr_cooldown(opt, 3e-4, 25, 400, 100, cooldown_power=power, cooldown_end_lr=end)
    ours = LrSchedule(kind="const_cooldown", warmup=25, total=400, cooldown=100, end_ratio=end / 3e-4, power=power)
    for step in range(400):
        assert 3e-4 * ours(step) == pytest.approx(theirs(step), rel=1e-12, abs=1e-18)


def test_restart_at_puts_a_new_schedule_at_the_resumed_step_and_refuses_a_run_with_no_step_left():
    from torch.optim.lr_scheduler import LambdaLR

    from fastclip.schedules import restart_at

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    longer = LrSchedule(kind="cosine", warmup=2, total=20)  # this run's config; the optimizer's state is the old run's
    scheduler = LambdaLR(opt, longer)
    opt.param_groups[0].update(lr=0.1 * 0.3, initial_lr=0.1)  # the checkpoint's peak 0.1, part way down its cosine
    restart_at(scheduler, longer, base_lr=0.5, step=4, where="latest")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * longer(4)) and scheduler.get_last_lr() == [0.5 * longer(4)]
    opt.step(), scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * longer(5))  # on from step 4, at the new peak
    restart_at(scheduler, longer, base_lr=0.5, step=19, where="latest")  # one step left: it trains
    with pytest.raises(ConfigError, match=r"'latest' is at step 20 and this run ends at step 20 .*--train.steps"):
        restart_at(scheduler, longer, base_lr=0.5, step=20, where="latest")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * longer(19))  # refused before anything moved


def test_const_cooldown_length_from_steps_or_epochs_and_its_errors():
    from fastclip.config import OptimConfig, TrainConfig
    from fastclip.schedules import cooldown_steps

    optim, train = OptimConfig(schedule="const_cooldown", warmup_steps=10, cooldown_epochs=1.5), TrainConfig()
    assert cooldown_steps(optim, train, total=100, steps_per_epoch=20) == 30
    steps = OptimConfig(schedule="const_cooldown", cooldown_steps=7)
    assert cooldown_steps(steps, train, total=100, steps_per_epoch=20) == 7
    assert cooldown_steps(OptimConfig(), train, total=100, steps_per_epoch=20) == 0  # cosine: none
    with pytest.raises(ConfigError, match=r"optim.cooldown_epochs=1.5 \(30 steps at 20 an epoch\).*"
                       r"train.epochs=3 of 20 steps.*make the cooldown 10 steps at most"):  # fmt: skip
        cooldown_steps(optim, train, total=20, steps_per_epoch=20)
    with pytest.raises(ConfigError, match="needs a cooldown"):
        OptimConfig(schedule="const_cooldown")
    with pytest.raises(ConfigError, match="optim.cooldown_end_lr"):
        OptimConfig(schedule="const_cooldown", cooldown_steps=5, lr=1e-3, cooldown_end_lr=2e-3)


def _cooldown_args(world_dir, tmp_path, *, steps: int, warmup: int, cooldown: int) -> list[str]:
    return small_run_args(world_dir, tmp_path, steps=steps) + [
        "--optim.warmup_steps", str(warmup), "--optim.schedule", "const_cooldown", "--optim.cooldown_steps",
        str(cooldown), "--data.loader", "torch",
    ]  # fmt: skip


def test_a_cooldown_longer_than_the_run_is_refused_before_any_model(world_dir, tmp_path):
    """A cooldown the run cannot hold was refused only once the model was built, as "must be 1 to -40 steps": now
    before it, in a line naming the fields, their values and what to change."""
    args = _cooldown_args(world_dir, tmp_path, steps=10, warmup=50, cooldown=100)
    proc = run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300)
    assert proc.returncode == 2 and "params" not in proc.stdout and "Traceback" not in proc.stderr, proc.stderr
    said = proc.stderr.strip().splitlines()[-1]
    for field in ("optim.cooldown_steps=100", "optim.warmup_steps=50", "the run's 10 steps (train.steps=10)"):
        assert field in said
    assert "-40" not in said and "lengthen the run" in said


@pytest.mark.parametrize(
    "extra, said",
    [
        # warmup alone fills the run: the warmup to lower, and by how much
        (["--train.steps", "10", "--optim.warmup_steps", "12"], "lower optim.warmup_steps to 5 at most"),
        # the run's length from the shards' count: 512 samples a epoch at 16 a step, 2 epochs
        (["--train.steps", "0", "--train.epochs", "2", "--optim.cooldown_steps", "70"],
         "the run's 64 steps (train.epochs=2 of 32 steps)"),
    ],
)  # fmt: skip
def test_cooldown_checks_against_the_run_length_in_preflight(world_dir, tmp_path, extra, said):
    cfg = parse_args(_cooldown_args(world_dir, tmp_path, steps=10, warmup=2, cooldown=5) + extra)
    with pytest.raises(ConfigError) as caught:
        check_inputs(cfg)
    assert said in str(caught.value)
    check_inputs(parse_args(_cooldown_args(world_dir, tmp_path, steps=10, warmup=5, cooldown=5)))  # fits exactly


def test_cosine_floor_and_restarts():
    cos = LrSchedule(kind="cosine", warmup=10, total=110, min_ratio=0.1)
    assert cos(0) == pytest.approx(0.1) and cos(9) == 1.0 and cos(10) == 1.0
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1) and cos(500) == pytest.approx(0.1)
    sgdr = LrSchedule(kind="cosine_restarts", warmup=0, total=1000, cycle=10, mult=2.0, decay=0.5)
    starts = [0, 10, 30, 70]  # cycles of 10, 20, 40, ...
    for i, start in enumerate(starts):
        assert sgdr(start) == pytest.approx(0.5**i)  # each restart at its (decayed) peak
        assert sgdr(start - 1) < 0.05 * 0.5 ** max(i - 1, 0) if start else True  # just before: near the floor
    assert sgdr(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    quarter = LrSchedule(kind="cosine_restarts", warmup=20, total=420)  # cycle 0: a quarter of 400
    assert quarter(120) == 1.0 and quarter(119) < 0.01


def test_early_stopping_counts_evaluations_without_improvement():
    stop = EarlyStopping(patience=2, min_delta=0.1)
    assert [stop.update(v, s) for s, v in enumerate([3.0, 2.5, 2.45, 2.5, 2.0, 1.95])] == [
        False, False, False, True, False, False,
    ]  # fmt: skip
    assert (stop.best, stop.best_step) == (2.0, 4)
    assert not EarlyStopping(patience=0).update(1.0, 1) and not EarlyStopping(patience=1).update(None, 1)


def test_early_stopping_config_errors(world_dir):
    with pytest.raises(ConfigError, match="eval.early_stop_patience: needs evaluations during training"):
        parse_args(["--eval.early_stop_patience", "3"])
    train = str(world_dir / "train" / "*.tar")
    cfg = parse_args(["--eval.early_stop_patience", "3", "--eval.every", "10", "--data.train_shards", train])
    with pytest.raises(ConfigError, match="eval.early_stop_patience: needs a validation set"):
        check_inputs(cfg)
    with pytest.raises(ConfigError, match="optim.schedule: must be one of cosine, cosine_restarts, constant"):
        parse_args(["--optim.schedule", "linear"])


def test_trainer_steps_the_schedule(single_rank, world_dir, tmp_path):
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path, steps=12) + [
        "--optim.schedule", "cosine_restarts", "--optim.restart_steps", "4", "--optim.lr", "1e-3", "--log.every", "100",
    ]  # fmt: skip
    trainer = Trainer(parse_args(args), single_rank)
    try:
        schedule = LrSchedule(kind="cosine_restarts", warmup=2, total=12, cycle=4)
        batches = iter(trainer.train_loader)
        for step in range(12):
            lr = trainer.engine.optimizer.param_groups[0]["lr"]  # what this step's update uses
            assert lr == pytest.approx(1e-3 * schedule(step)), step
            trainer.train_step(batches)
    finally:
        trainer.close()
    engine, parameter = weakref.ref(trainer.engine), weakref.ref(next(trainer.engine.module.parameters()))
    del trainer
    gc.collect()
    assert engine() is None and parameter() is None, "a closed trainer's engine and parameters stay in memory"


@pytest.mark.slow
def test_early_stop_ends_training_with_a_checkpoint(world_dir, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(world_dir, out, steps=40, batch=8) + [
        "--optim.lr",
        "1e-12",
        "--eval.every",
        "2",
        "--eval.early_stop_patience",
        "2",
        "--eval.early_stop_min_delta",
        "0.01",
        "--eval.zeroshot",
        "false",
        "--train.grad_accum",
        "2",
    ]  # fmt: skip  (accumulated: the stop counts optimizer steps, not micro batches)
    proc = run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "val/clip_loss" in r] == [2, 4, 6]  # no second evaluation at the stop
    (stop,) = [r for r in records if r.get("early_stop")]
    assert stop["step"] == 6 and stop["val/best_step"] == 2
    assert max(r["step"] for r in records if "loss" in r) == 6
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (out / "checkpoints" / "open_clip.pt").is_file() and "early stop at step 6" in proc.stdout
