"""The folders a run writes: refused before any model when unwritable or held by another run, and a save that
finds no room (or fails part-way) said in one line, its partial folder gone, the run's weights kept."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastclip import run_folders
from fastclip.checkpoint import CheckpointError, read_latest
from fastclip.cli import parse_args
from fastclip.errors import ConfigError
from fastclip.preflight import check_inputs
from fastclip.run_folders import RunLock, check_writable
from fastclip.world import slurm_alone

from runs import ROOT, run_cli, small_run_args

UNWRITABLE = "/sys/fs"  # exists on every Linux, and takes no new file even from root (chmod would not stop root)


@pytest.mark.parametrize("field", ["checkpoint.dir", "log.dir"])
def test_an_unwritable_folder_is_refused_before_any_model(world_dir, tmp_path, field):
    where = {"checkpoint.dir": UNWRITABLE, "log.dir": str(tmp_path / "a-file" / "logs")}[field]
    (tmp_path / "a-file").write_text("a file where a folder is asked for")
    args = small_run_args(world_dir, tmp_path / "run", steps=2) + [f"--{field}", where]
    with pytest.raises(ConfigError, match=rf"^{field}: cannot write to {where} \(.*\): the run would train"):
        check_inputs(parse_args(args))


def test_the_command_line_says_it_in_one_line_and_exit_2(world_dir, tmp_path):
    args = small_run_args(world_dir, tmp_path / "run", steps=2) + ["--checkpoint.dir", UNWRITABLE]
    proc = run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        f"fastclip: checkpoint.dir: cannot write to {UNWRITABLE} (Permission denied): the run would train and then "
        "lose what it saves there. Point --checkpoint.dir at a writable folder."
    ]


def test_a_benchmark_does_not_need_its_checkpoint_folder(world_dir, tmp_path):
    args = small_run_args(world_dir, tmp_path / "run", steps=2) + ["--checkpoint.dir", UNWRITABLE]
    check_inputs(parse_args(args + ["--train.benchmark", "2"]))
    check_writable(tmp_path / "new" / "deep", "log.dir")  # created, then written
    assert (tmp_path / "new" / "deep").is_dir() and not list((tmp_path / "new" / "deep").iterdir())


def _holder(folder) -> subprocess.Popen:
    """Another process holding the run lock of ``folder`` until killed."""
    code = (
        "import sys, time; from fastclip.run_folders import RunLock; "
        f"lock = RunLock({{'log.dir': {str(folder)!r}}}).acquire(); print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_held_folders_is_refused_naming_the_first_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = _holder(tmp_path / "logs")
    try:
        with pytest.raises(ConfigError, match=rf"log.dir: {tmp_path / 'logs'} is in use by another run \(host .*, "
                           rf"pid {holder.pid}, started .*\): two runs writing one folder"):  # fmt: skip
            RunLock({"log.dir": tmp_path / "logs"}).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock({"log.dir": tmp_path / "logs", "checkpoint.dir": tmp_path / "ckpt"}).acquire()
    try:
        assert lock.notes == [f"took over {tmp_path / 'logs'} (held by host {lock_host()}, pid {holder.pid}, started "
                              f"{lock.notes[0].split('started ')[1]}"]  # fmt: skip
    finally:
        lock.release()
    again = RunLock({"log.dir": tmp_path / "logs"}).acquire()  # released cleanly: nothing to take over
    assert again.notes == []
    again.release()


def lock_host() -> str:
    import socket

    return socket.gethostname()


def test_the_train_command_is_refused_while_another_run_holds_its_folder(world_dir, tmp_path):
    args = small_run_args(world_dir, tmp_path / "run", steps=2)
    holder = _holder(tmp_path / "run")  # log.dir
    try:
        env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}  # a batch shell's variables, without srun's step ones
        proc = run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300, env=env)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"is in use by another run (host {lock_host()}, pid {holder.pid}" in proc.stderr
    assert "SLURM_PROCID=1 but no srun step variables" in proc.stdout
    assert not (tmp_path / "run" / "checkpoints" / "latest").exists()


def test_slurm_alone_speaks_only_for_a_task_other_than_0_outside_a_step():
    assert slurm_alone({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}).startswith("SLURM_PROCID=1 but no srun step")
    assert slurm_alone({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}) is None
    assert slurm_alone({"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2"}) is None  # srun maps it to RANK
    assert slurm_alone({"SLURM_PROCID": "1", "RANK": "1"}) is None
    assert slurm_alone({}) is None


# ------------------------------------------------------------------------------------------------ room to save


def _trainer(single_rank, world_dir, tmp_path, *extra):
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=6) + ["--log.every", "1000", *extra]
    return Trainer(parse_args(args), single_rank)


def test_a_run_without_room_for_one_checkpoint_is_refused_before_its_first_step(
    single_rank, world_dir, tmp_path, monkeypatch
):
    trainer = _trainer(single_rank, world_dir, tmp_path)
    monkeypatch.setattr(run_folders, "free_bytes", lambda path: 1_000_000)
    try:
        with pytest.raises(CheckpointError, match=r"checkpoint.dir: a checkpoint and open_clip.pt needs about .* MB "
                           r"in .*, which has 1.0 MB free: the run would train and then fail"):  # fmt: skip
            trainer.train()
        assert trainer.step == 0
    finally:
        trainer.close()


def test_a_save_without_room_is_skipped_mid_run_and_refused_at_the_end_with_the_weights_kept(
    single_rank, world_dir, tmp_path, monkeypatch, caplog
):
    trainer = _trainer(single_rank, world_dir, tmp_path, "--checkpoint.every", "2")
    root = tmp_path / "run" / "checkpoints"
    room = {"free": 10**12}
    save = trainer.checkpoints.save

    def full_after_step_2(state, **kwargs):
        if state.step > 2:
            room["free"] = 1000  # the disk fills up (the export at the end still finds room in the test)
        return save(state, **kwargs)

    monkeypatch.setattr(trainer.checkpoints, "save", full_after_step_2)
    monkeypatch.setattr(run_folders, "free_bytes", lambda path: room["free"])
    try:
        with pytest.raises(CheckpointError, match=r"checkpoint: step 6 not saved: step 6 needs about .* which has "
                           r"1.0 KB free; latest still names step_00000002; the final weights are in "
                           r".*open_clip.pt. Free space"):  # fmt: skip
            trainer.train()
    finally:
        trainer.close()
    assert "checkpoint: step 4 not saved" in caplog.text and "Training goes on" in caplog.text
    assert read_latest(root) == "step_00000002" and sorted(p.name for p in root.glob("step_*")) == ["step_00000002"]
    assert torch.load(root / "open_clip.pt", weights_only=True)["step"] == 6  # the weights outlived the failed save


def test_a_save_that_fails_part_way_removes_its_folder_and_says_what_latest_names(
    single_rank, world_dir, tmp_path, monkeypatch
):
    trainer = _trainer(single_rank, world_dir, tmp_path, "--checkpoint.every", "3")
    root = tmp_path / "run" / "checkpoints"
    engine_save = trainer.engine.save_checkpoint

    def on_a_full_disk(save_dir, **kwargs):
        if kwargs["tag"] == "step_00000003":
            return engine_save(save_dir, **kwargs)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
        try:
            return engine_save(save_dir, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous)

    monkeypatch.setattr(trainer.engine, "save_checkpoint", on_a_full_disk)
    try:
        with pytest.raises(CheckpointError) as failed:
            trainer.train()
    finally:
        trainer.close()
    message = str(failed.value)
    assert message.startswith(f"checkpoint: saving step 6 to {root / 'step_00000006'} failed (")
    assert "The partial folder was removed; latest still names step_00000003" in message
    assert "\n" not in message
    assert not (root / "step_00000006").exists() and read_latest(root) == "step_00000003"
    assert torch.load(root / "open_clip.pt", weights_only=True)["step"] == 6


def test_the_export_goes_to_the_next_folder_when_one_will_not_take_it(tmp_path, caplog):
    from fastclip.open_clip_file import write_export

    state = {"logit_scale": torch.ones(1), "visual.proj": torch.randn(4, 2)}
    path = write_export([Path(UNWRITABLE), tmp_path], state, step=9, model="fastclip-tiny")
    assert path == tmp_path / "open_clip.pt" and torch.load(path, weights_only=True)["step"] == 9
    assert f"open_clip.pt: could not write it to {UNWRITABLE}" in caplog.text
    with pytest.raises(
        CheckpointError, match=rf"open_clip.pt of step 9 could not be written anywhere \({UNWRITABLE}: "
    ):
        write_export([Path(UNWRITABLE)], state, step=9, model="fastclip-tiny")
