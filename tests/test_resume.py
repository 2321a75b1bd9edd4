"""A resumed run goes on with the samples the interrupted run had not reached, in the same order."""

import pytest

from fastclip.cli import parse_args

from runs import small_run_args


def _recording(trainer, seen: list):
    fetch = trainer.fetch

    def recorded(batches):
        batch = fetch(batches)
        seen.append([tuple(t.tolist()) for t in batch.texts])
        return batch

    trainer.fetch = recorded
    return trainer


def _data_only_step(trainer, batches) -> None:
    """A step's fetches of its micro batches and its count, without the forward, backward and optimizer step."""
    for _ in range(trainer.cfg.train.grad_accum):
        trainer.fetch(batches)
    trainer.state.step += 1
    trainer.state.samples_seen += trainer.global_batch


RESAMPLED = ["--data.resampled", "true", "--data.train_num_samples", "300"]


@pytest.mark.parametrize(
    "loader, accum, extra",
    [("dali", 1, []), ("torch", 1, []), ("dali", 2, []), ("torch", 1, RESAMPLED), ("dali", 1, RESAMPLED),
     ("torch", 1, ["--data.train_num_samples", "200"])],
)  # fmt: skip
def test_resume_replays_the_samples_after_the_checkpoint(
    single_rank, world_dir, tmp_path, capsys, loader, accum, extra
):
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=40, batch=16 // accum)
    args += ["--log.every", "1000", "--data.loader", loader, "--train.grad_accum", str(accum), *extra]
    seen_first: list = []
    first = _recording(Trainer(parse_args(args), single_rank), seen_first)
    try:
        batches = iter(first.train_loader)
        for _ in range(33):  # the loader moved as steps move it, without the model's work (a second each here)
            _data_only_step(first, batches)
        for _ in range(5):  # 608 samples in 38 steps: the checkpoint falls in the second epoch
            first.train_step(batches)
            if first.step == 35:
                first.save()
    finally:
        first.close()
    assert (tmp_path / "run" / "checkpoints" / "step_00000035" / "data_rank00000.json").is_file()
    seen_again: list = []
    again = _recording(Trainer(parse_args(args + ["--checkpoint.resume", "latest"]), single_rank), seen_again)
    try:
        assert again.step == 35
        batches = iter(again.train_loader)
        for _ in range(3):
            again.train_step(batches)
    finally:
        again.close()
    assert len(seen_first) == 38 * accum  # every micro batch of a step is fetched (contrastive: before the loss)
    assert seen_again == seen_first[35 * accum : 38 * accum]
    assert "goes on from the checkpoint's position" in capsys.readouterr().out


def test_changed_batch_size_starts_the_stream_afresh(single_rank, world_dir, tmp_path, capsys):
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=4) + ["--log.every", "1000", "--data.loader", "dali"]
    first = Trainer(parse_args(args), single_rank)
    try:
        batches = iter(first.train_loader)
        first.train_step(batches)
        first.save()
    finally:
        first.close()
    again = Trainer(parse_args(args + ["--checkpoint.resume", "latest", "--data.batch_size", "8"]), single_rank)
    again.close()
    assert again.step == 1
    assert "starts afresh (batch_size changed since the checkpoint)" in capsys.readouterr().out
    other = Trainer(parse_args(args + ["--checkpoint.resume", "latest", "--data.loader", "torch"]), single_rank)
    other.close()
    assert "starts afresh (the position was saved by the dali loader, this is the torch loader)" in (
        capsys.readouterr().out
    )


def _train(trainer, steps):
    batches = iter(trainer.train_loader)
    lrs = []
    for _ in range(steps):
        trainer.train_step(batches)
        lrs.append(trainer.lr)
    return lrs


def test_resume_follows_this_runs_schedule_and_adamw_settings(single_rank, world_dir, tmp_path, capsys):
    from fastclip.schedules import LrSchedule
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=4) + ["--log.every", "1000", "--data.loader", "dali"]
    first = Trainer(parse_args(args), single_rank)
    try:
        _train(first, 4)  # a finished run: its cosine has reached lr 0
        first.save()
    finally:
        first.close()
    more = ["--checkpoint.resume", "latest", "--train.steps", "12", "--optim.lr", "5e-4", "--optim.eps", "1e-7"]
    again = Trainer(parse_args(args + more + ["--optim.weight_decay", "0.2"]), single_rank)
    try:
        lrs = _train(again, 3)
        groups = again.engine.optimizer.param_groups
    finally:
        again.close()
    schedule = LrSchedule(kind="cosine", warmup=2, total=12)
    assert lrs == pytest.approx([5e-4 * schedule(k) for k in (4, 5, 6)])
    assert min(lrs) > 1e-4  # the old run's schedule would give lr 0 here
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0] and {g["eps"] for g in groups} == {1e-7}
    out = capsys.readouterr().out
    assert "changed since the checkpoint: " in out
    assert "optim.lr 0.001 -> 0.0005" in out and "train.steps 4 -> 12" in out and "optim.weight_decay 0.1 -> 0.2" in out


def test_resume_with_nothing_left_to_train_is_refused(single_rank, world_dir, tmp_path):
    from fastclip.errors import ConfigError
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=2) + ["--log.every", "1000"]
    first = Trainer(parse_args(args), single_rank)
    try:
        _train(first, 2)
        first.save()
    finally:
        first.close()
    with pytest.raises(ConfigError, match=r"at step 2 and this run ends at step 2 .*Raise --train.steps"):
        Trainer(parse_args(args + ["--checkpoint.resume", "latest"]), single_rank)


def test_a_checkpoint_that_does_not_load_is_named_in_one_line(single_rank, world_dir, tmp_path):
    from fastclip.checkpoint import CheckpointError
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=4) + ["--log.every", "1000", "--data.loader", "dali"]
    first = Trainer(parse_args(args), single_rank)
    try:
        _train(first, 1)
        first.save()
    finally:
        first.close()
    ckpt = tmp_path / "run" / "checkpoints"
    (optim,) = (ckpt / "step_00000001").glob("*optim_states.pt")
    optim.unlink()  # as a rank whose save never finished leaves it
    resume = args + ["--checkpoint.resume", "latest"]
    with pytest.raises(CheckpointError, match=r"step_00000001 does not load on this run \(1 ranks, ZeRO-2\)") as err:
        Trainer(parse_args(resume), single_rank)
    assert "\n" not in str(err.value)
    (ckpt / "latest").write_text("step_00000009")
    with pytest.raises(CheckpointError, match=r"step_00000009 does not exist \(it is what .*latest names\)"):
        Trainer(parse_args(resume), single_rank)


def test_train_state_round_trips_and_loads_the_previous_format():
    from fastclip.checkpoint import TrainState
    from fastclip.eval import EarlyStopping

    state = TrainState(EarlyStopping(patience=3), step=12, samples_seen=768)
    state.early_stopping.update(2.5, 4)
    state.early_stopping.update(2.6, 8)
    again = TrainState(EarlyStopping(patience=5))
    again.load_state_dict(state.state_dict())
    assert (again.step, again.samples_seen, again.early_stopping.best, again.early_stopping.evals_since_best) == (
        12, 768, 2.5, 1
    )  # fmt: skip
    assert again.early_stopping.patience == 5  # this run's patience, the saved count
    older = {"step": 3, "samples_seen": 96, "early_stopping": {"best": 1.5, "best_step": 2, "evals_since_best": 0},
             "config": {}}  # fmt: skip
    loaded = TrainState(EarlyStopping(patience=2))
    loaded.load_state_dict(older)  # a client state as fastclip wrote it before TrainState
    assert (loaded.step, loaded.early_stopping.best, loaded.early_stopping.best_step) == (3, 1.5, 2)
    plain = TrainState(EarlyStopping(patience=2))
    plain.load_state_dict({"step": 1, "samples_seen": 8})  # older still: no early-stopping state at all
    assert plain.step == 1 and plain.early_stopping.best == float("inf")


def test_a_checkpoint_folder_that_cannot_be_deleted_is_said_once(tmp_path, monkeypatch, capfd):
    import os

    from fastclip.checkpoint import _delete

    folder = tmp_path / "step_00000001"
    folder.mkdir()
    for i in range(5):
        (folder / f"shard{i}.pt").write_bytes(b"x")
    unlink = os.unlink
    monkeypatch.setattr(os, "unlink", lambda *a, **k: (_ for _ in ()).throw(PermissionError("read-only filesystem")))
    _delete(folder)
    monkeypatch.setattr(os, "unlink", unlink)
    err = capfd.readouterr().err
    assert err.count("checkpoint.keep:") == 1 and "files of" in err and "read-only filesystem" in err
    assert folder.is_dir()  # it stays, and the run goes on


def test_shards_added_since_the_checkpoint_start_the_stream_afresh(single_rank, world_dir, tmp_path, capsys):
    """The same glob, more shards: the saved position belongs to another shard list."""
    import shutil

    from fastclip.trainer import Trainer

    train = tmp_path / "train"
    shutil.copytree(world_dir / "train", train)
    args = small_run_args(world_dir, tmp_path / "run", steps=4) + ["--log.every", "1000"]
    args[args.index("--data.train_shards") + 1] = str(train / "*.tar")
    first = Trainer(parse_args(args), single_rank)
    try:
        first.train_step(iter(first.train_loader))
        first.save()
    finally:
        first.close()
    shutil.copy(train / "shard-000000.tar", train / "shard-999999.tar")
    again = Trainer(parse_args(args + ["--checkpoint.resume", "latest"]), single_rank)
    again.close()
    assert "starts afresh (shard_list changed since the checkpoint)" in capsys.readouterr().out


def _damaged_world(world_dir, root, every: int):
    """A copy of the world's train shards with every ``every``-th JPEG damaged (its markers kept, its data not)."""
    import io
    import tarfile

    root.mkdir()
    for src in sorted((world_dir / "train").glob("*.tar")):
        with tarfile.open(src) as tin, tarfile.open(root / src.name, "w") as tout:
            for member in tin:
                data = tin.extractfile(member).read()
                if member.name.endswith(".jpg") and int(member.name[-12:-4]) % every == 3:
                    data = data[:200] + b"not a jpeg any more" * 20 + data[-2:]
                    member.size = len(data)
                tout.addfile(member, io.BytesIO(data))
    return root / "*.tar"


def _losses(trainer, steps: int, *, save_at: int | None = None) -> list[float]:
    losses: list[float] = []
    compute = trainer.compute_loss

    def recorded(out):
        loss, scalars = compute(out)
        losses.append(loss.item())
        return loss, scalars

    trainer.compute_loss = recorded
    batches = iter(trainer.train_loader)
    for _ in range(steps):
        trainer.train_step(batches)
        if trainer.step == save_at:
            trainer.save()
    return losses


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_resume_after_skipped_images_gives_every_later_loss_of_the_uninterrupted_run(
    single_rank, world_dir, tmp_path, capsys, loader
):
    from fastclip.trainer import Trainer

    shards = _damaged_world(world_dir, tmp_path / "damaged", every=29)  # 18 of 512 images
    args = small_run_args(world_dir, tmp_path / "run", steps=14, batch=16)
    args += ["--data.train_shards", str(shards), "--data.loader", loader, "--train.precision", "fp32"]
    args += ["--data.crop_scale", "[1.0, 1.0]", "--log.every", "1000", "--data.num_threads", "2"]  # crops: whole
    first = Trainer(parse_args(args), single_rank)
    try:
        uninterrupted = _losses(first, 14, save_at=8)
        assert first.train_loader.skipped >= 3  # before the checkpoint, in each torch worker
    finally:
        first.close()
    again = Trainer(parse_args(args + ["--checkpoint.resume", "latest"]), single_rank)
    try:
        assert again.step == 8
        resumed = _losses(again, 6)
    finally:
        again.close()
    assert resumed == uninterrupted[8:]
    out = capsys.readouterr().out
    assert "goes on from the checkpoint's position" in out and "inexactly" not in out


# A stand-in for DeepSpeed's ds_to_universal, found first on PYTHONPATH: like the real one it runs a pool of worker
# processes; it writes the pids of its parent, itself and its worker, then works for a minute
_SLOW_CONVERTER = """
import os, sys, time
from concurrent.futures import ProcessPoolExecutor

if __name__ == "__main__":
    with ProcessPoolExecutor(max_workers=1) as pool:
        pids = [os.getppid(), os.getpid(), pool.submit(os.getpid).result()]
        with open(os.environ["CONVERTER_PIDS"] + ".tmp", "w") as f:
            f.write(" ".join(map(str, pids)))
        os.rename(os.environ["CONVERTER_PIDS"] + ".tmp", os.environ["CONVERTER_PIDS"])
        pool.submit(time.sleep, 60)
        time.sleep(60)
"""
# the rank: Ctrl-C's handler first, which a process started in the background by a shell without job control (a CI
# script's `cmd &`) would not have, SIGINT being ignored there from the start
_CONVERT = "import signal, sys; from pathlib import Path; from fastclip.reshard import to_universal; " \
    "signal.signal(signal.SIGINT, signal.default_int_handler); " \
    "to_universal(Path(sys.argv[1]), Path(sys.argv[2]))"  # fmt: skip


def _alive(pid: int) -> bool:
    """Running, not a zombie (a container's pid 1 may never reap the orphans it inherits)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_the_universal_conversion_ends_with_the_process_that_started_it(tmp_path, sig):
    """A rank killed while DeepSpeed converts a checkpoint to its universal format left the converter and its
    workers running, orphans writing into checkpoint.dir."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from runs import ROOT, clean_env

    package = tmp_path / "fake" / "deepspeed" / "checkpoint"
    package.mkdir(parents=True)
    for init in (package.parent / "__init__.py", package / "__init__.py"):
        init.write_text("")
    (package / "ds_to_universal.py").write_text(_SLOW_CONVERTER)
    pids_file = tmp_path / "pids"
    env = clean_env({"PYTHONPATH": os.pathsep.join([str(tmp_path / "fake"), str(ROOT)]),
                     "CONVERTER_PIDS": str(pids_file)})  # fmt: skip
    rank = subprocess.Popen([sys.executable, "-c", _CONVERT, str(tmp_path / "step"), str(tmp_path / "universal")],
                            cwd=ROOT, env=env, stderr=subprocess.DEVNULL)  # fmt: skip
    pids = []
    try:
        deadline = time.monotonic() + 10
        while not pids_file.exists() and time.monotonic() < deadline and rank.poll() is None:
            time.sleep(0.05)
        assert pids_file.exists(), "the stand-in converter did not start"
        pids = [int(p) for p in pids_file.read_text().split()]
        rank.send_signal(getattr(signal, sig))
        rank.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(map(_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if _alive(p)], f"still running after the rank's {sig}: {pids}"
    finally:
        rank.kill()
        for pid in pids:
            if pid != rank.pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
