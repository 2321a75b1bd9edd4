"""Preemption: seconds from SIGTERM to the exit of a run that was training, against open_clip's checkpoint save of
the same model and AdamW state, timed in the same run on the same disk.

fastclip: ``python fastclip/train.py`` (one CPU rank, the demo world) is started in a session of its own and left
to train until its metrics show step ``WARM`` (so the step time is steady and the loader's workers are up); then
SIGTERM goes to its whole process group, as srun and Kubernetes signal every process of a job. The figure runs from
the signal to the process's exit: the current step finished, one checkpoint written (model, optimizer, scheduler,
data position), ``latest`` moved, exit 75. The run's save must fit ``checkpoint.signal_grace_s``; this is how
much of a cluster's warning it takes.

baseline: open_clip's save of the same model (``open_clip.create_model`` of the same config) with its AdamW state,
as open_clip's train.py writes it (``torch.save`` of ``{epoch, name, state_dict, optimizer}``): the bare cost of
writing the state. The ratio says what fastclip's stop costs beyond that (finishing a step, the agreement, the
data position, DeepSpeed's layout of the files); open_clip itself has no stop: a signal loses the steps since its
last epoch-end save.

Cases: fastclip-tiny (quick and full) and ViT-B-32 (full only: its checkpoint is 2.4 GB in fp32, and CI need not
write it). ``extra``: seconds from the signal to ``latest`` naming the checkpoint (the rest of the figure
is the process's exit: loader workers, DeepSpeed, the interpreter), the checkpoint's bytes, the step the signal
came at and the step saved, and the precision ``train.precision auto`` chose (the run's default).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import Result, bench_once, wait_or_kill

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from runs import clean_env  # noqa: E402

WARM = 3  # steps logged before the signal
MODELS = {"quick": ("fastclip-tiny",), "full": ("fastclip-tiny", "ViT-B-32")}
BATCH = {"fastclip-tiny": 16, "ViT-B-32": 4}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _logged_step(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if '"loss"' in line]
    return max(steps, default=0)


def _stop_a_run(model: str, out: Path) -> dict:
    """Train ``model`` until step WARM is logged, SIGTERM its process group; seconds to exit, and what it left."""
    args = ["--model.name", model, "--data.batch_size", str(BATCH[model]), "--data.val_shards", "null",
            "--train.steps", "100000", "--log.every", "1", "--log.progress", "false", "--log.dir", str(out),
            "--checkpoint.dir", str(out / "checkpoints"), "--checkpoint.every", "100000",
            "--checkpoint.export_open_clip", "false"]  # fmt: skip
    # without the rank variables an earlier benchmark of this session set (its MASTER_PORT may still be held)
    env = clean_env({"FASTCLIP_DEMO_DIR": str(ROOT / ".cache" / "fastclip-demo")})
    with open(out / "run.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(ROOT / "fastclip" / "train.py"), *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 900
        while _logged_step(out / "metrics.jsonl") < WARM:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{model}: no step {WARM} logged\n{(out / 'run.log').read_text()[-3000:]}")
            time.sleep(0.05)
        at = _logged_step(out / "metrics.jsonl")
        latest, saved_s = out / "checkpoints" / "latest", None
        start = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        while proc.poll() is None and time.perf_counter() - start < 600:
            if saved_s is None and latest.exists():  # the step finished and the checkpoint whole
                saved_s = time.perf_counter() - start
            time.sleep(0.01)
        seconds, code = time.perf_counter() - start, proc.poll()
    finally:
        wait_or_kill([proc], timeout=0)
    assert code == 75, f"{model}: exit {code}\n{(out / 'run.log').read_text()[-3000:]}"
    tag = (out / "checkpoints" / "latest").read_text().strip()
    folder = out / "checkpoints" / tag
    precision = json.loads((folder / "fastclip.json").read_text())["precision"]
    return {"seconds": seconds, "saved_s": saved_s, "bytes": _folder_bytes(folder), "signal_at": at, "saved": tag,
            "precision": precision}  # fmt: skip


def _open_clip_save(model: str, folder: Path) -> tuple[float, int]:
    """open_clip's checkpoint of ``model`` with AdamW's moments (one step taken), written as its train.py does."""
    import open_clip

    from fastclip.model import resolve_model_name

    clip = open_clip.create_model(resolve_model_name(model))
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-4)
    for p in clip.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # the moments exist, as in any checkpoint after the first step
    path = folder / "epoch_1.pt"
    start = time.perf_counter()
    torch.save({"epoch": 1, "name": model, "state_dict": clip.state_dict(), "optimizer": optimizer.state_dict()}, path)
    os.sync()  # fastclip's save ends with its files on disk (fsync): count the same here
    return time.perf_counter() - start, path.stat().st_size


@pytest.mark.parametrize("model", MODELS["full"])
def test_preemption_sigterm_to_exit_cpu(benchmark, record, quick, model, tmp_path):
    if quick and model not in MODELS["quick"]:
        pytest.skip("full mode only: a ViT-B-32 engine on the CPU")
    params = {"model": model, "batch": BATCH[model], "ranks": 1}
    (tmp_path / "fastclip").mkdir()
    (tmp_path / "open_clip").mkdir()  # the same disk as fastclip's checkpoint
    stopped = bench_once(benchmark, lambda: _stop_a_run(model, tmp_path / "fastclip"))
    shutil.rmtree(tmp_path / "fastclip")  # ViT-B-32's is 2.4 GB
    baseline, baseline_bytes = _open_clip_save(model, tmp_path / "open_clip")
    extra = {"to_latest_s": stopped["saved_s"], "checkpoint_bytes": stopped["bytes"], "open_clip_bytes": baseline_bytes,
             "signal_at_step": stopped["signal_at"], "saved": stopped["saved"],
             "precision": stopped["precision"]}  # fmt: skip
    note = (f"seconds, lower is better; {stopped['saved_s']:.1f} s to 'latest', the rest is the exit "
            f"({stopped['precision']}); open_clip: torch.save of the same model and AdamW state")  # fmt: skip
    record(Result("preemption", f"SIGTERM to exit {model} cpu", params, "seconds", stopped["seconds"], baseline,
                  extra=extra, note=note))  # fmt: skip
