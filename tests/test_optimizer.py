"""optim.fused: torch's fused AdamW (one kernel a step) in place of its foreach ops, through DeepSpeed's ZeRO."""

from __future__ import annotations

import pytest
import torch

from fastclip.cli import parse_args
from fastclip.engine import deepspeed_config
from fastclip.errors import ConfigError

from runs import small_run_args, two_steps


def _changes_after_two_steps(single_rank, world_dir, tmp_path, fused: str) -> tuple[dict, bool]:
    from fastclip.trainer import Trainer

    extra = ["--optim.fused", fused, "--train.precision", "fp32", "--train.zero_stage", "2", "--log.every", "1000",
             "--data.val_shards", "null", "--optim.warmup_steps", "0"]  # fmt: skip
    trainer = Trainer(parse_args(small_run_args(world_dir, tmp_path / fused, steps=4) + extra), single_rank)
    try:
        before = {n: p.detach().clone() for n, p in trainer.clip.named_parameters()}
        two_steps(trainer)
        base = trainer.engine.optimizer.optimizer  # ZeRO's wrapped torch optimizer
        after = {n: p.detach().clone() for n, p in trainer.clip.named_parameters()}
        return {n: after[n] - before[n] for n in after}, bool(base.defaults.get("fused"))
    finally:
        trainer.close()


def test_fused_adamw_takes_the_foreach_step(single_rank, world_dir, tmp_path):
    torch.manual_seed(0)
    fused, fused_on = _changes_after_two_steps(single_rank, world_dir, tmp_path, "true")
    torch.manual_seed(0)
    foreach, foreach_on = _changes_after_two_steps(single_rank, world_dir, tmp_path, "false")
    assert fused_on and not foreach_on
    # the same update: each tensor's change within 2e-3 of its largest (the two order AdamW's arithmetic apart:
    # 5e-4 seen; a wrong beta, eps or decay is a larger difference)
    for name, change in foreach.items():
        assert change.abs().max() > 0, name
        assert (fused[name] - change).abs().max() <= 2e-3 * change.abs().max(), name


def test_fused_is_the_default_and_deepspeeds_fused_adam_replaces_it():
    for cuda in (True, False):
        params = deepspeed_config(parse_args([]), world_size=1, cuda=cuda)["optimizer"]["params"]
        assert params["fused"] is True and params["torch_adam"] is True
    assert (
        "fused"
        not in deepspeed_config(parse_args(["--optim.fused", "false"]), world_size=1, cuda=True)["optimizer"]["params"]
    )
    params = deepspeed_config(parse_args(["--optim.fused_adam", "true"]), world_size=1, cuda=True)["optimizer"][
        "params"
    ]
    assert "fused" not in params and params["torch_adam"] is False  # DeepSpeed's FusedAdam
    with pytest.raises(ConfigError, match="optim.fused: expected true or false"):
        parse_args(["--optim.fused", "maybe"])
