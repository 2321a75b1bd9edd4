"""No host syncs in a non-logging step: the audit that finds them, DeepSpeed's that fastclip removes, and what a
non-finite loss does now that DeepSpeed no longer checks for one every step."""

import gc
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from fastclip.syncs import HostSyncAudit, optimizer_step_counters

from runs import ROOT, run_cli, small_run_args, two_steps


def test_audit_counts_value_reads_and_spares_host_tensors():
    counter, x = torch.tensor(3.0), torch.randn(16)
    with HostSyncAudit(host_tensors=[counter]) as audit:
        counter.item()  # a host tensor by declaration: not a sync
        y = (x * 2).sum()  # queued work: not a sync
        x.nonzero()
        if y > -1e9:  # bool() of a tensor
            float(y)
        torch.cuda.synchronize() if torch.cuda.is_available() else None
    kinds = sorted(s.kind for s in audit.syncs.elements())
    expected = ["aten::_local_scalar_dense", "aten::_local_scalar_dense", "aten::nonzero"]
    assert kinds == sorted(expected + (["synchronize"] if torch.cuda.is_available() else []))
    assert all("test_host_sync.py" in s.where for s in audit.syncs)
    assert "host sync(s)" in audit.report()


def test_audit_ignores_garbage_left_before_the_block():
    """An object dropped in a reference cycle before the audit (a DeepSpeed engine from an earlier test) may be
    collected inside the block; its ``__del__`` synchronize is not the audited code's."""
    from deepspeed.accelerator import get_accelerator

    class Engine:
        def __del__(self):
            get_accelerator().synchronize()

    gc.disable()  # keep the cycle alive until the audit starts, as an unlucky collector schedule does
    try:
        engine = Engine()
        engine.cycle = engine
        del engine
        with HostSyncAudit() as audit:
            gc.collect()  # the collector runs at some allocation inside the block
    finally:
        gc.enable()
    assert audit.total == 0, audit.report()


# whether a step syncs does not depend on its batch's size; 4 samples take a third of 16's time where bf16 matmuls are
# emulated (this CPU)
BATCH = 4


def _trainer(world, world_dir, tmp_path, extra):
    from fastclip.cli import parse_args
    from fastclip.trainer import Trainer

    # bf16 unless a case says otherwise: what GPUs run, whose steps must not sync (fp32 ZeRO-1/2 do, by design)
    args = small_run_args(world_dir, tmp_path, steps=20, batch=BATCH) + ["--log.every", "1000",
                                                                         "--train.precision", "bf16"]  # fmt: skip
    return Trainer(parse_args(args + extra), world)


def _config_with_timers(world_dir, tmp_path, extra):
    from fastclip.cli import parse_args
    from fastclip.engine import deepspeed_config

    cfg = parse_args(small_run_args(world_dir, tmp_path, steps=20, batch=BATCH) + ["--train.precision", "bf16", *extra])
    ds = deepspeed_config(cfg, world_size=1, cuda=False)
    assert ds["timers"]["throughput"]["enabled"] is False
    ds["timers"]["throughput"]["enabled"] = True
    path = tmp_path / "ds_timers.json"
    path.write_text(json.dumps(ds))
    return path


@pytest.mark.parametrize(
    "extra, syncs_expected",
    [
        (["--train.zero_stage", "1"], False),
        (["--train.zero_stage", "2"], False),
        (["--train.zero_stage", "1", "--train.grad_accum", "3"], False),  # contrastive: cache, one loss, replay
        (["--train.zero_stage", "2", "--train.grad_accum", "3"], False),
        (["--train.zero_stage", "2", "--train.grad_accum", "2", "--train.accum_mode", "independent"], False),
        # DeepSpeed's own per-step inf/NaN check, on request: the audit must see its syncs
        (["--train.zero_stage", "2", "--optim.skip_nonfinite", "true"], True),
        # DeepSpeed's throughput timer, which the derived config turns off, synchronizes twice a step
        (["--train.zero_stage", "2", "timers-on"], True),
        # fp32: ZeRO-1/2 read the grad norm's validity on the host to skip a non-finite step (kept; fastclip/zero.py)
        (["--train.zero_stage", "2", "--train.precision", "fp32"], True),
        (["--train.zero_stage", "2", "--train.precision", "amp_bf16"], True),  # fp32 partitions too
    ],
)
def test_zero_1_2_steps_have_no_host_syncs(single_rank, world_dir, tmp_path, extra, syncs_expected):
    if "timers-on" in extra:
        extra = extra[:-1] + ["--deepspeed_config", str(_config_with_timers(world_dir, tmp_path, extra[:-1]))]
    trainer = _trainer(single_rank, world_dir, tmp_path, extra)
    try:
        batches = iter(trainer.train_loader)
        for _ in range(2):  # optimizer state exists after the first step
            trainer.train_step(batches)
        with HostSyncAudit(host_tensors=optimizer_step_counters(trainer.engine.optimizer)) as audit:
            for _ in range(3):
                trainer.train_step(batches)
        means = trainer.meters.collect()  # the logging step's one sync, outside the audit
    finally:
        trainer.close()
    if syncs_expected:
        assert audit.total >= 3, audit.report()
        assert ("synchronize" in {s.kind for s in audit.syncs}) == ("--deepspeed_config" in extra), audit.report()
    else:
        assert audit.total == 0, audit.report()
    assert torch.isfinite(torch.tensor([means["loss"], means["grad_norm"]])).all() and means["grad_norm"] > 0


@pytest.mark.parametrize(
    "norm",
    [3.7, 0.25, float("inf"), float("nan"), -1.0],  # -1: DeepSpeed's sentinel for an invalid group norm
)
def test_sync_free_clipping_matches_deepspeed(norm):
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from fastclip.zero import _unscale_and_clip_grads

    opt = SimpleNamespace(clip_grad=1.0, loss_scale=1.0, device="cpu")
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(1000, generator=g), [torch.randn(10, generator=g), torch.randn(7, generator=g)]]
    theirs = [grads[0].clone(), [t.clone() for t in grads[1]]]
    with HostSyncAudit() as audit:
        _unscale_and_clip_grads(opt, grads, torch.tensor(norm))
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(opt, theirs, torch.tensor(norm))
    assert audit.total == 0, audit.report()
    torch.testing.assert_close(grads[0], theirs[0], rtol=0, atol=0)
    for ours, ref in zip(grads[1], theirs[1]):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # the partition's gradients: fp32 or bf16
@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
def test_foreach_grad_norm_matches_deepspeeds(single_rank, dtype, poison):
    """fastclip's one-kernel grad norm gives DeepSpeed's fp64 per-tensor one (relative 1e-5) for fp32 and bf16
    gradients, leaves out the partition's padding as DeepSpeed does, marks an invalid norm -1, syncs nothing."""
    import deepspeed.comm as dist
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from fastclip.zero import _grad_norm_direct

    dist.init_distributed(dist_backend="gloo")  # deepspeed.comm over the process group the fixture made
    opt = SimpleNamespace(model_parallel_group=None, model_parallel_rank=0, dp_process_group=None, device="cpu",
                          _model_parallel_all_reduce=lambda tensor, op: None)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    grads = [(torch.randn(n, generator=g) * scale).to(dtype) for n, scale in ((4096, 1e-3), (512, 10.0), (1, 3.0))]
    grads.append(torch.zeros(0, dtype=dtype))
    if poison is not None:
        grads[1][7] = poison
    params = [torch.nn.Parameter(torch.empty_like(t)) for t in grads]
    padding = torch.full((64,), 1e3, dtype=dtype)
    padding._zero_padding = True  # DeepSpeed's mark on a partition's alignment padding: not a gradient
    with HostSyncAudit() as audit:
        ours = _grad_norm_direct(opt, [*grads, padding], params)
    assert audit.total == 0, audit.report()
    theirs = DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, [*grads, padding], params)
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=0)
    if poison is not None:
        assert ours.item() == -1.0


def test_bf16_zero2_trainer_takes_the_foreach_grad_norm(single_rank, world_dir, tmp_path):
    """The trainer's ZeRO-2 optimizer has fastclip's grad norm, and on a real backward's bf16 partition gradients it
    gives DeepSpeed's own value."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    from fastclip.zero import _grad_norm_direct

    trainer = _trainer(single_rank, world_dir, tmp_path, ["--train.zero_stage", "2"])
    try:
        opt = trainer.engine.optimizer
        assert opt.get_grad_norm_direct.__func__ is _grad_norm_direct
        loss, _ = trainer.forward_and_loss(next(iter(trainer.train_loader)))
        trainer.backward(loss)  # at the accumulation boundary: the partition's gradients are averaged_gradients
        grads, params = opt.averaged_gradients[0], opt.params_in_partition[0]
        assert {g.dtype for g in grads} == {torch.bfloat16} and len(grads) > 10
        ours, theirs = (
            opt.get_grad_norm_direct(grads, params),
            DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, grads, params),
        )
        assert ours > 0
        torch.testing.assert_close(ours, theirs.float(), rtol=1e-5, atol=0)
    finally:
        trainer.close()


@pytest.mark.slow
@pytest.mark.parametrize("log_every", [1, 100])  # caught at a log step, or at the checkpoint step before it
def test_divergence_stops_the_run_and_keeps_the_last_checkpoint(world_dir, tmp_path, log_every):
    out = tmp_path / "run"
    args = small_run_args(world_dir, out, steps=8) + [
        "--optim.lr", "1e30", "--checkpoint.every", "1", "--eval.every", "0", "--log.every", str(log_every),
        "--train.precision", "bf16",  # fp32 ZeRO-2 skips a non-finite step itself (DeepSpeed's overflow check)
    ]  # fmt: skip
    proc = run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "training diverged at step" in proc.stderr and "--optim.skip_nonfinite true" in proc.stderr
    saved = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert saved and latest == saved[-1] and f"({out / 'checkpoints' / latest})" in proc.stderr
    step = int(proc.stderr.split("training diverged at step ")[1].split(":")[0])
    assert int(latest.split("_")[1]) < step  # nothing was saved from the diverged state
    assert not (out / "checkpoints" / "open_clip.pt").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("accum", [1, 2])  # 2: contrastive accumulation, which captures and restores CUDA RNG state
def test_gpu_step_has_no_host_syncs(single_rank, world_dir, tmp_path, accum):
    """On CUDA, torch's own sync detector and the audit together: a ZeRO-2 bf16 step with the Triton loss,
    on batches already on the device (the loaders' threads are not part of the step)."""
    import traceback
    import warnings

    extra = ["--data.loader", "torch", "--data.num_threads", "2", "--train.tf32", "false"]  # fp32 matmuls left exact
    extra += ["--train.grad_accum", str(accum)]
    trainer = _trainer(single_rank, world_dir, tmp_path, extra)
    try:
        batches = two_steps(trainer)
        torch.cuda.synchronize()
        syncs = []  # (message, where): the Python stack at each synchronizing call, so a failure names the line

        def record(message, category, filename, lineno, file=None, line=None):
            if "synchroniz" in str(message).lower():
                syncs.append((str(message), "".join(traceback.format_stack(limit=14)[:-1])))

        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(), HostSyncAudit(device="cuda") as audit:
                warnings.simplefilter("always")
                warnings.showwarning = record
                for _ in range(3):
                    trainer.train_step(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        means = trainer.meters.collect()
    finally:
        trainer.close()
    where = sorted({w for _, w in syncs}, key=len)
    assert not syncs, f"{len(syncs)} synchronizing calls; {len(where)} places, first:\n" + "\n---\n".join(where[:3])
    assert audit.total == 0, audit.report()
    assert torch.isfinite(torch.tensor(means["loss"]))
