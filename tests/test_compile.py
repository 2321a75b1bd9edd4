"""``train.compile model | step``: the same training as eager (fp32), no recompiles after the first step, no host
syncs in a bf16 ZeRO-2 step, accumulation and eval with it, ZeRO-0/3 refused. The backend here is ``aot_eager``
(dynamo's and AOTAutograd's tracing, the part that can break on fastclip's code, without inductor's minutes of CPU
codegen); the benchmark compares inductor's speed."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastclip.errors import ConfigError
from fastclip.syncs import HostSyncAudit, optimizer_step_counters

from runs import small_run_args


def _trainer(world, world_dir, tmp_path, extra, batch=16):
    from fastclip.cli import parse_args
    from fastclip.trainer import Trainer

    torch._dynamo.reset()
    cfg = parse_args(small_run_args(world_dir, tmp_path, steps=20, batch=batch) + ["--log.every", "1000", *extra])
    return Trainer(cfg, world)


def _run(world, world_dir, tmp_path, extra, batches, steps):
    trainer = _trainer(world, world_dir, tmp_path, extra)
    try:
        for _ in range(steps):
            trainer.train_step(batches())
        loss = trainer.meters.collect()["loss"]
        params = {n: p.detach().clone() for n, p in trainer.engine.module.named_parameters()}
        if trainer.compiled_forward is not None or trainer.compiled_step is not None:
            with no_recompiles():
                for _ in range(3):
                    trainer.train_step(batches())
        return loss, params
    finally:
        trainer.close()


class no_recompiles:
    """Any recompile inside raises (dynamo's error_on_recompile)."""

    def __enter__(self):
        torch._dynamo.config.error_on_recompile = True

    def __exit__(self, *exc):
        torch._dynamo.config.error_on_recompile = False


def test_compiled_steps_train_as_eager_without_recompiles(single_rank, world_dir, tmp_path):
    from fastclip.data.batch import Batch

    common = ["--train.precision", "fp32", "--train.zero_stage", "2", "--train.compile_backend", "aot_eager"]
    probe = _trainer(single_rank, world_dir, tmp_path / "probe", common)
    loaded = iter(probe.train_loader)
    fixed = [next(loaded) for _ in range(2)]
    probe.close()

    def batches():
        return iter(Batch(images=b.images, texts=b.texts) for b in itertools.cycle(fixed))

    ref_loss, ref = _run(single_rank, world_dir, tmp_path / "eager", common, batches, 5)
    for mode in ("model", "step"):
        extra = [*common, "--train.compile", mode]
        loss, params = _run(single_rank, world_dir, tmp_path / mode, extra, batches, 5)
        assert loss == pytest.approx(ref_loss, rel=1e-5), mode
        for name, value in params.items():
            torch.testing.assert_close(value, ref[name], rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")


@pytest.mark.parametrize("accum", [1, 2])
def test_compiled_bf16_steps_have_no_host_syncs_and_evaluate(single_rank, world_dir, tmp_path, accum):
    """bf16 ZeRO-2 with train.compile step, one micro batch (towers and loss one graph) and contrastive accumulation
    (towers and loss apart): no recompiles and no host syncs after the first steps; eval runs eager. Batches of 8:
    neither depends on the batch's size, and bf16 is emulated here (the eval's last batch holds the other 4)."""
    extra = ["--train.compile", "step", "--train.compile_backend", "aot_eager", "--train.grad_accum", str(accum),
             "--train.precision", "bf16"]  # fmt: skip
    trainer = _trainer(single_rank, world_dir, tmp_path, extra, batch=8)
    try:
        batches = iter(trainer.train_loader)
        for _ in range(2):
            trainer.train_step(batches)
        assert (trainer.compiled_forward is not None) == (accum > 1) and trainer.precision == "bf16"
        with no_recompiles(), HostSyncAudit(host_tensors=optimizer_step_counters(trainer.engine.optimizer)) as audit:
            for _ in range(3):
                trainer.train_step(batches)
        assert audit.total == 0, audit.report()
        assert torch.isfinite(torch.tensor(trainer.meters.collect()["loss"]))
        metrics = trainer.evaluate()  # the eager module: other batch sizes, no recompiles
        assert metrics["val/samples"] == 100 and metrics["val/clip_loss"] == metrics["val/clip_loss"]
    finally:
        trainer.close()


@pytest.mark.parametrize("stage", [0, 3])
def test_compile_is_refused_at_zero_0_and_3(stage):
    from fastclip.cli import parse_args

    with pytest.raises(ConfigError, match=f"train.compile model needs ZeRO-1 or 2 \\(train.zero_stage is {stage}\\)"):
        parse_args(["--train.compile", "model", "--train.zero_stage", str(stage)])
