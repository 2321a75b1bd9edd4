"""The trainer end to end, as users start it: deepspeed launcher, several CPU ranks (gloo), real shards."""

import json
import statistics
import sys

import pytest
import torch

from runs import NEEDS_DALI, ROOT, run_cli, small_run_args

pytestmark = pytest.mark.slow


def _records(log_dir):
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def _check(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.train_shards", "/nonexistent/shard-*.tar"], "data.train_shards"),
        (["--data.batch_size", "0"], "data.batch_size: must be a positive integer"),
        (["--train.stepz", "3"], "Did you mean 'train.steps'"),
    ],
)
def test_config_errors_stop_before_any_model(tmp_path, args, message):
    proc = run_cli([sys.executable, "-m", "fastclip.train", "--log.dir", str(tmp_path), *args], cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "params" not in proc.stdout and "Traceback" not in proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


def test_batch_size_mismatch_with_deepspeed_config_is_an_error(world_dir, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 999}))
    proc = run_cli(
        [
            sys.executable,
            "-m",
            "fastclip.train",
            *small_run_args(world_dir, tmp_path, steps=1),
            "--deepspeed_config",
            str(ds),
        ],
        cwd=ROOT,
        timeout=300,
    )
    assert proc.returncode == 2 and "train_batch_size=999 where the run config gives" in proc.stderr
    assert "params" not in proc.stdout  # refused before the model was built


@pytest.mark.parametrize("stage", [0])  # ZeRO-1/2/3: tests/test_accumulation.py, tests/test_multinode.py
def test_every_zero_stage_trains_evaluates_and_exports(world_dir, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    args = small_run_args(world_dir, out, steps=3) + ["--train.zero_stage", str(stage), "--eval.every", "2"]
    proc = run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300)
    _check(proc)
    assert f"ZeRO-{stage}" in proc.stdout
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val/clip_loss" in r] == [2, 3]  # mid-run eval, then training goes on
    state = torch.load(out / "checkpoints" / "open_clip.pt")["state_dict"]
    assert state["logit_scale"].shape == () and all(torch.isfinite(v).all() for v in state.values())
    assert state["visual.conv1.weight"].dtype == torch.float32 and state["visual.conv1.weight"].abs().sum() > 0
    # the standalone export of the last step folder: the same fp32 masters (bf16 ZeRO-0's from its optimizer)
    exported = out / "exported.pt"
    cmd = [sys.executable, "-m", "fastclip.export", str(out / "checkpoints"), "--out", str(exported)]
    _check(run_cli(cmd, cwd=ROOT, timeout=300))
    again = torch.load(exported)["state_dict"]
    assert again.keys() == state.keys() and all(torch.equal(again[k], v) for k, v in state.items())
    assert any(not torch.equal(v, v.bfloat16().float()) for v in state.values())  # masters, not bf16 copies


def test_torch_fallback_loader_trains(world_dir, tmp_path):
    """The torch loader, with the SigLIP loss on a CLIP architecture (the softmax loss has the ZeRO-stage test)."""
    out = tmp_path / "torch-loader"
    args = small_run_args(world_dir, out, steps=3) + ["--data.loader", "torch", "--data.num_threads", "1"]
    args += ["--loss.kind", "siglip"]
    proc = run_cli([sys.executable, "-m", "fastclip.train", *args, "--train.peak_tflops", "0.5"], cwd=ROOT, timeout=300)
    _check(proc)
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    # every log line: MFU against the given peak (model FLOPs of the architecture), and no device memory on a CPU
    from fastclip.config import ModelConfig
    from fastclip.mfu import train_flops_per_sample

    flops = train_flops_per_sample(ModelConfig(name="fastclip-tiny", force_image_size=32))
    for r in (r for r in records if "loss" in r):
        assert r["peak_memory_gb"] is None and 0 < r["mfu"] < 1
        assert abs(r["mfu"] - r["samples_per_second_per_gpu"] * flops / 0.5e12) <= 1e-9 * max(r["mfu"], 1e-9) + 1e-12
    assert " | mfu " in proc.stdout
    evals = [r for r in records if "val/zeroshot_top1" in r]
    assert len(evals) == 1 and evals[0]["val/samples"] == 100
    # SigLIP: the bias is built (open_clip_train's -10), trained, logged, in the val loss and in the export, whose
    # standalone rebuild of the architecture (with the bias) loads it strictly
    assert all("logit_bias" in r for r in records if "loss" in r) and " | logit_bias " in proc.stdout
    assert "val/siglip_loss" in evals[0] and "val/clip_loss" not in evals[0]
    exported = tmp_path / "siglip.pt"
    cmd = [sys.executable, "-m", "fastclip.export", str(out / "checkpoints"), "--out", str(exported)]
    _check(run_cli(cmd, cwd=ROOT, timeout=300))
    bias = torch.load(exported)["state_dict"]["logit_bias"]
    assert bias.shape == () and -10.1 < float(bias) < -9.9 and float(bias) != -10.0
    e = evals[0]
    assert e["val/zeroshot_top1"] <= e["val/zeroshot_top5"] and e["val/image_to_text_R@1"] <= e["val/image_to_text_R@5"]
    assert e["val/image_to_text_R@5"] <= e["val/image_to_text_R@10"] and "val/text_to_image_R@10" in e

    # --train.benchmark of this configuration on one rank: its data-excluded rate agrees with the trainer's own
    # logged rate within a 2-core machine's noise (the data path of this tiny run is a small share)
    from test_benchmark_mode import check_report

    bench = tmp_path / "bench1"
    cmd = [sys.executable, "-m", "fastclip.train", *small_run_args(world_dir, bench, steps=8),
           "--data.loader", "torch", "--data.num_threads", "1", "--train.peak_tflops", "0.5",
           "--train.benchmark", "4", "--train.benchmark_warmup", "1"]  # fmt: skip
    report = check_report(bench, run_cli(cmd, cwd=ROOT, timeout=300), ranks=1, steps=4, mfu=True)
    trained = statistics.median(r["samples_per_second_per_gpu"] for r in records if r.get("step", 0) > 1 and "lr" in r)
    rate = report["phases"]["data excluded"]["samples_per_second_per_gpu"]
    assert trained / 3 < rate < trained * 3, (rate, trained)


@pytest.mark.gpu
@pytest.mark.parametrize("loader", ["torch", pytest.param("dali", marks=NEEDS_DALI)])
def test_gpu_short_train_run(world_dir, tmp_path, loader):
    """On one GPU: the loader's GPU decode (torch: nvJPEG through torchvision; DALI: its mixed decoder, where the
    GPU image has DALI: benchmarks/gpu_dali.sh), the bf16 engine, the Triton loss, eval and export."""
    out = tmp_path / "gpu"
    args = small_run_args(world_dir, out, steps=20, batch=32) + ["--data.loader", loader, "--optim.lr", "2e-3"]
    _check(run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=400))
    train = [r for r in _records(out) if "loss" in r]
    assert len(train) == 20 and sum(r["loss"] for r in train[-3:]) < sum(r["loss"] for r in train[:3])
    assert (out / "checkpoints" / "open_clip.pt").exists()


def test_checkpoint_keep_deletes_the_oldest(world_dir, tmp_path):
    out = tmp_path / "keep"
    args = small_run_args(world_dir, out, steps=5) + ["--checkpoint.every", "1", "--checkpoint.keep", "2"]
    _check(run_cli([sys.executable, "-m", "fastclip.train", *args, "--eval.zeroshot", "false"], cwd=ROOT, timeout=300))
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000004", "step_00000005"]
    assert (ckpt / "latest").read_text().strip() == "step_00000005" and (ckpt / "open_clip.pt").is_file()
