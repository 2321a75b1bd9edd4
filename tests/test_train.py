"""The trainer end to end, as users start it: deepspeed launcher, several CPU ranks (gloo), real shards."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from runs import ROOT, clean_env, deepspeed_cmd, run_cli, small_run_args

pytestmark = pytest.mark.slow

KEYS = {
    "step", "epoch", "samples_seen", "loss", "lr", "logit_scale", "samples_per_second",
    "samples_per_second_per_gpu", "data_time", "batch_time", "grad_norm",
}  # fmt: skip


def _records(log_dir):
    return [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def _check(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )


def test_two_ranks_train_log_eval_and_checkpoint(world_dir, tmp_path):
    out = tmp_path / "run"
    # two micro batches of 8 per rank and step, accumulated contrastively: 32 samples a step, as one batch of 16
    args = small_run_args(world_dir, out, steps=14, batch=8) + ["--optim.lr", "2e-3", "--train.grad_accum", "2"]
    proc = run_cli(deepspeed_cmd(2, 29611) + args, cwd=ROOT)
    _check(proc)
    records = _records(out)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 15))
    for r in train:
        assert KEYS <= set(r)
        assert r["samples_per_second_per_gpu"] == pytest.approx(r["samples_per_second"] / 2)
        assert r["samples_seen"] == r["step"] * 32
    first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
    assert last < first - 0.1, f"loss did not fall: {first:.3f} -> {last:.3f}"
    evals = [r for r in records if "val/clip_loss" in r]
    assert len(evals) == 1 and evals[0]["val/samples"] == 100
    assert {"val/zeroshot_top1", "val/image_to_text_R@1", "val/text_to_image_R@1"} <= set(evals[0])
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step_00000014"
    assert any((ckpt / "step_00000014").iterdir())
    assert "step 14/14" in proc.stdout and "samples/s" in proc.stdout and "zeroshot_top1" in proc.stdout
    assert "contrastive batch 32: accumulation 'contrastive', one loss over 2 micro batches of 8" in proc.stdout

    import open_clip

    from fastclip.model import _BUILTIN_CONFIGS

    open_clip.add_model_config(_BUILTIN_CONFIGS / "fastclip-tiny.json")  # what a user does for a custom arch
    model = open_clip.create_model("fastclip-tiny", pretrained=str(ckpt / "open_clip.pt"), force_image_size=32)
    assert model.logit_scale.shape == ()


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


def _grads(tmp_path, world_dir, ranks, port):
    out = tmp_path / f"grads{ranks}.pt"
    args = small_run_args(world_dir, tmp_path / f"log{ranks}", steps=1, batch=24 // ranks)
    args += ["--train.precision", "fp32", "--train.zero_stage", "0", "--data.val_shards", "null"]
    cmd = deepspeed_cmd(ranks, port)
    cmd[-1] = str(ROOT / "tests" / "grad_worker.py")
    _check(run_cli(cmd + ["--out", str(out), "--global_batch", "24", *args], cwd=ROOT))
    return torch.load(out)


def test_two_ranks_equal_one_rank_on_the_same_global_batch(world_dir, tmp_path):
    one, two = _grads(tmp_path, world_dir, 1, 29612), _grads(tmp_path, world_dir, 2, 29613)
    torch.testing.assert_close(two["loss"], one["loss"], rtol=1e-5, atol=1e-6)
    assert one["grads"].keys() == two["grads"].keys()
    for name, g in one["grads"].items():
        torch.testing.assert_close(two["grads"][name], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert one["grads"]["logit_scale"].abs().sum() > 0


def test_killed_run_leaves_a_loadable_checkpoint_and_resumes(world_dir, tmp_path):
    out = tmp_path / "run"
    args = small_run_args(world_dir, out, steps=10_000, batch=8) + ["--checkpoint.every", "3"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastclip.train", *args],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_00000006"):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), proc.stdout.read().decode()[-3000:]
    saved = latest.read_text().strip()
    step = int(saved.split("_")[1])
    resumed = run_cli(
        [sys.executable, "-m", "fastclip.train", *small_run_args(world_dir, out, steps=step + 2, batch=8)]
        + ["--checkpoint.resume", "latest", "--eval.zeroshot", "false"],
        cwd=ROOT,
        timeout=300,
    )
    _check(resumed)
    assert f"at step {step}" in resumed.stdout
    assert "the train stream goes on from the checkpoint's position" in resumed.stdout
    steps = [r["step"] for r in _records(out) if "loss" in r]
    assert steps[-2:] == [step + 1, step + 2]


@pytest.mark.parametrize("stage", [0, 1, 3])
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


def test_torch_fallback_loader_trains(world_dir, tmp_path):
    out = tmp_path / "torch-loader"
    args = small_run_args(world_dir, out, steps=3) + ["--data.loader", "torch", "--data.num_threads", "1"]
    _check(run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300))
    records = _records(out)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    evals = [r for r in records if "val/zeroshot_top1" in r]
    assert len(evals) == 1 and evals[0]["val/samples"] == 100


@pytest.mark.gpu
def test_gpu_short_train_run(world_dir, tmp_path):
    """On one GPU: the torch loader with nvJPEG decode, the bf16 engine, the Triton loss, eval and export."""
    out = tmp_path / "gpu"
    args = small_run_args(world_dir, out, steps=20, batch=32) + ["--data.loader", "torch", "--optim.lr", "2e-3"]
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
