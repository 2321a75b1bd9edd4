"""What a run leaves in its checkpoint folder when things go wrong: a slow rank mid-save, weights that are NaN."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fastclip.world import free_port

from runs import ROOT, TRAIN, clean_env, run_cli, small_run_args, torchrun_cmd

pytestmark = pytest.mark.slow

# Imported by every Python process of the run (PYTHONPATH); only rank 1 is touched. Its optimizer-state file of
# the step named by FASTCLIP_TEST_SLOW_TAG is left half-written while the rank hangs, as a rank behind a slow
# shared filesystem would be when the job is killed.
SLOW_RANK = """
import os, time
if os.environ.get("RANK") == "1":
    import torch
    _save = torch.save
    def save(obj, f, *args, **kwargs):
        if os.environ["FASTCLIP_TEST_SLOW_TAG"] in str(f) and "optim_states" in str(f):
            with open(f, "wb") as out:
                out.write(b"the first bytes of a torch file")
            open(os.environ["FASTCLIP_TEST_MARKER"], "w").close()
            time.sleep(600)
        return _save(obj, f, *args, **kwargs)
    torch.save = save
"""


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def test_latest_never_names_a_checkpoint_a_slow_rank_is_still_writing(world_dir, tmp_path):
    out, hooks, marker = tmp_path / "run", tmp_path / "hooks", tmp_path / "rank1-is-writing"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_RANK)
    args = small_run_args(world_dir, out, steps=6, batch=8) + ["--checkpoint.every", "2", "--eval.zeroshot", "false"]
    env = clean_env(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
            "FASTCLIP_TEST_SLOW_TAG": "step_00000004",
            "FASTCLIP_TEST_MARKER": str(marker),
        }
    )
    proc = subprocess.Popen(
        torchrun_cmd(2, free_port(), TRAIN) + args, cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    latest = out / "checkpoints" / "latest"
    try:
        assert _wait_for(marker.exists, 300), "rank 1 never reached its step-4 save"
        # rank 0 is done with its own files: give it the time to move 'latest', if it would
        _wait_for(lambda: latest.read_text().strip() == "step_00000004", 8)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        log = proc.communicate()[0].decode()
    assert latest.read_text().strip() == "step_00000002", log[-3000:]
    resumed = run_cli(torchrun_cmd(2, free_port(), TRAIN) + args + ["--checkpoint.resume", "latest"], cwd=ROOT)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "at step 2" in resumed.stdout and latest.read_text().strip() == "step_00000006"


def _nan_weights(path):
    """fastclip-tiny weights (32 px) with a NaN in the text projection, as open_clip saves them."""
    from fastclip.config import ModelConfig
    from fastclip.model import build_model, open_clip_state_dict

    state = open_clip_state_dict(build_model(ModelConfig(force_image_size=32)).state_dict())
    state["text_projection"][0, 0] = float("nan")
    torch.save({"state_dict": state}, path)


def _strict_records(log_dir):
    def refuse(constant):
        raise ValueError(f"metrics.jsonl holds {constant}, which is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    "limit, steps, message",
    [
        (3, 8, "steps 1-3 were all skipped because their gradients were not finite"),
        (50, 3, "the weights hold non-finite values (text_projection)"),  # the run ends before the limit
    ],
)
def test_skipping_nonfinite_steps_never_ends_in_a_nan_export(world_dir, tmp_path, limit, steps, message):
    out = tmp_path / "run"
    _nan_weights(tmp_path / "nan.pt")
    args = small_run_args(world_dir, out, steps=steps) + ["--model.pretrained", str(tmp_path / "nan.pt")]
    args += ["--optim.skip_nonfinite", "true", "--optim.max_skipped_steps", str(limit), "--eval.zeroshot", "false"]
    proc = run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert message in proc.stderr and "nothing was saved" in proc.stderr
    assert "add --optim.skip_nonfinite" not in proc.stderr and "Check --model.pretrained" in proc.stderr  # it is on
    assert not (out / "checkpoints" / "open_clip.pt").exists() and not (out / "checkpoints" / "latest").exists()
    train = [r for r in _strict_records(out) if "loss" in r]
    assert train and all(r["loss"] is None for r in train) and train[-1]["skipped_steps"] == train[-1]["step"]


def test_a_resume_under_another_loss_kind_is_refused_with_the_flag_to_pass(tmp_path):
    from fastclip.checkpoint import check_same_model
    from fastclip.errors import ConfigError

    params = {"logit_scale": [1], "logit_bias": [1]}
    saved = {"model": "fastclip-tiny", "loss_kind": "siglip", "params": params}
    check_same_model(tmp_path, saved, {"model": "fastclip-tiny", "loss_kind": "siglip", "params": params})
    with pytest.raises(ConfigError, match="trained with loss.kind siglip; this run's loss is clip.*--loss.kind siglip"):
        check_same_model(tmp_path, saved, {"model": "fastclip-tiny", "loss_kind": "clip", "params": {}})
    older = {"model": "fastclip-tiny", "params": {}}  # folders from before SigLIP: the softmax loss
    with pytest.raises(ConfigError, match="--loss.kind clip"):
        check_same_model(tmp_path, older, {"model": "fastclip-tiny", "loss_kind": "siglip", "params": params})
