"""Preemption (fastclip/preemption.py): SIGTERM to one rank or to every process of a run stops the ranks at one
step with one checkpoint and exit 75, and the same command with ``--checkpoint.resume auto`` goes on with the
losses of a run never stopped; a second signal, or a save past ``checkpoint.signal_grace_s``, ends the run at
once with ``latest`` untouched."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastclip import preemption
from fastclip.preemption import EXIT_CODE, RUN_AHEAD, SAME_SIGNAL_S, StopRequests
from fastclip.world import free_port

from runs import ROOT, TRAIN, clean_env, deepspeed_cmd, rank_pids, small_run_args, torchrun_cmd, wait_all

# fp32, whole-image crops and the torch loader: a resumed run's losses equal the uninterrupted run's
EXACT = ["--train.precision", "fp32", "--data.loader", "torch", "--data.num_threads", "1",
         "--data.crop_scale", "[1.0, 1.0]", "--data.val_shards", "null", "--checkpoint.export_open_clip", "false",
         "--dist.heartbeat_s", "1", "--dist.lost_after_s", "8"]  # fmt: skip
STEPS = 26  # past the latest second stop the random steps allow (13 + 3 + 3 + RUN_AHEAD + 2)


def _losses(out: Path) -> dict[int, float]:
    """The loss logged at each step; a step logged twice (before a stop and after the resume) must agree."""
    losses: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            assert r["step"] not in losses or losses[r["step"]] == pytest.approx(r["loss"], rel=1e-5), r
            losses[r["step"]] = r["loss"]
    return losses


def _launch(args: list[str], tmp: Path, name: str, *, launcher=deepspeed_cmd) -> subprocess.Popen:
    path = tmp / f"{name}.log"
    cmd = deepspeed_cmd(2, free_port()) if launcher is deepspeed_cmd else torchrun_cmd(2, free_port(), TRAIN)
    with open(path, "w") as log:
        proc = subprocess.Popen(cmd + args, cwd=ROOT, env=clean_env(), stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = path
    return proc


def _stopped(args, tmp, name, *, after: int, ranks: list[int]):
    """Launch, wait for step ``after`` in the log, SIGTERM ``ranks``' processes (with their loader workers, as a
    cluster signals every process of a job); the launcher's output and exit code."""
    proc = _launch(args, tmp, name)
    log_dir = Path(args[args.index("--log.dir") + 1])
    metrics, deadline = log_dir / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= after for line in metrics.read_text().split(
                "\n") if line.strip() and "loss" in line):  # fmt: skip
            break
        time.sleep(0.05)
    assert proc.poll() is None, wait_all([proc])[0][-4000:]
    for rank in ranks:
        pids = rank_pids(rank, log_dir, workers=True)
        assert pids, f"no rank {rank} process with --log.dir {log_dir}"
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
    return wait_all([proc], timeout=180)[0], proc.returncode


@pytest.fixture(scope="module")
def preempted(world_dir, tmp_path_factory):
    """One run never stopped, and one stopped twice with the same command (by the deepspeed launcher, as users
    start it): SIGTERM to rank 1 alone at a random step, then to every process of both ranks at another. The second
    run, requeued after the first stop, is the one whose losses must equal the uninterrupted run's; the third
    (requeued after the second) would repeat that check for a minute of CI, so the second stop's checkpoint is
    checked by its files."""
    tmp = tmp_path_factory.mktemp("preempted")
    common = EXACT + ["--checkpoint.every", "5", "--checkpoint.resume", "auto"]
    reference = tmp / "reference"
    ref = _launch(
        small_run_args(world_dir, reference, steps=STEPS, batch=8) + common, tmp, "reference", launcher=torchrun_cmd
    )  # its exit status is not what is tested: 4 s less
    ref_out = wait_all([ref])[0]
    assert ref.returncode == 0, ref_out[-4000:]
    out = tmp / "run"
    args = small_run_args(world_dir, out, steps=STEPS, batch=8) + common
    rng = random.Random(os.environ.get("PYTEST_XDIST_WORKER", "") + str(time.time_ns()))
    first_at, second_after = rng.randint(2, 5), rng.randint(1, 3)
    one = _stopped(args, tmp, "one", after=first_at, ranks=[1])
    stopped_one = _latest_step(out)
    every = _stopped(args, tmp, "every", after=stopped_one + second_after, ranks=[0, 1])
    stopped_every = _latest_step(out)
    return SimpleNamespace(reference=reference, out=out, one=one, every=every, stops=(stopped_one, stopped_every),
                           asked=(first_at, second_after))  # fmt: skip


def _latest_step(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])


@pytest.mark.slow
def test_sigterm_to_one_rank_or_every_process_stops_together_and_the_requeued_run_goes_on_exactly(preempted):
    run = preempted
    (one_out, one_code), (every_out, every_code) = run.one, run.every
    assert one_code == EXIT_CODE, one_out[-4000:]
    assert every_code == EXIT_CODE, every_out[-4000:]
    first, second = run.stops
    # the signal lands within a step or two of the one seen in the log; the ranks stop RUN_AHEAD + 2 after it
    assert run.asked[0] + RUN_AHEAD + 2 <= first <= run.asked[0] + RUN_AHEAD + 5, (run.asked, first, one_out[-3000:])
    assert first < second < STEPS, (run.stops, every_out[-3000:])
    folder = run.out / "checkpoints" / f"step_{first:08d}"
    assert (
        f"stopped at step {first} on SIGTERM to rank 1; checkpoint {folder}. The same command with "
        "--checkpoint.resume auto goes on from there (exit 75: requeue)" in one_out
    )
    assert "SIGTERM: finishing this step, then one checkpoint and exit 75" in one_out
    assert f"resumed from {run.out / 'checkpoints'}/step_{first:08d} at step {first}" in every_out
    assert re.search(rf"stopped at step {second} on SIGTERM to rank [01]; checkpoint", every_out)
    for text in (one_out, every_out):
        assert "Traceback" not in text and "worker" not in text.lower().replace("dataloader workers", ""), text[-3000:]
    # each stop wrote one whole checkpoint of every rank, at the agreed step
    for step in (first, second):
        folder = run.out / "checkpoints" / f"step_{step:08d}"
        assert sorted(p.name for p in folder.glob("data_rank*.json")) == ["data_rank00000.json", "data_rank00001.json"]
    ours, reference = _losses(run.out), _losses(run.reference)
    assert sorted(ours) == list(range(1, second + 1)) and sorted(reference) == list(range(1, STEPS + 1))
    for step in range(1, second + 1):  # after `first`: the requeued run's, which went on from the first stop
        assert ours[step] == pytest.approx(reference[step], rel=1e-5), (step, ours, reference)


# ------------------------------------------------------------------------------------- one rank, in detail

SLOW_SAVE = """
import sys, time
from fastclip import checkpoint, train

write = checkpoint.CheckpointManager._write
def slow(self, folder, state, **kw):
    if state.step > 2:  # the signal's checkpoint, not the periodic one at step 2
        print("saving: slowly", flush=True)
        time.sleep(10)  # far past what the tests below allow: make test's other worker may slow the exit
    return write(self, folder, state, **kw)
checkpoint.CheckpointManager._write = slow
train.main(sys.argv[1:])
"""


def _one_rank(world_dir, tmp_path, extra: list[str]) -> subprocess.Popen:
    out = tmp_path / "run"
    args = small_run_args(world_dir, out, steps=1000, batch=8) + EXACT + ["--checkpoint.every", "2"] + extra
    return subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *args], cwd=ROOT, env=clean_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def _read_until(proc, marker: str, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return
    raise AssertionError("".join(lines)[-3000:])


def _exited(proc, start: float) -> float:
    """Seconds from ``start`` to the process's exit (not to the end of its output: that its loader workers were
    ended with it, the test's time says)."""
    proc.wait(timeout=60)
    return time.monotonic() - start


def _ended(world_dir, tmp_path, extra: list[str], stop) -> tuple[int, float, str, str]:
    """One rank run until its periodic checkpoint at step 2, then ``stop(proc, lines)`` signals it and returns when
    the clock on its exit starts: its exit status, the seconds from then to its exit, its output, and the step
    folder ``latest`` names."""
    proc, lines = _one_rank(world_dir, tmp_path, extra), []
    try:
        _read_until(proc, "checkpoint: ", lines)  # the periodic one at step 2
        took = _exited(proc, stop(proc, lines))
    finally:
        proc.kill()
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    return proc.returncode, took, "".join(lines) + proc.stdout.read(), latest


def test_a_second_signal_during_the_save_ends_at_once_and_latest_keeps_the_previous(world_dir, tmp_path):
    def twice(proc, lines):
        proc.send_signal(signal.SIGTERM)
        _read_until(proc, "saving: slowly", lines)
        time.sleep(SAME_SIGNAL_S)  # sooner, it would count as the first one reaching the process twice
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        return start

    code, took, text, latest = _ended(world_dir, tmp_path, [], twice)
    assert code == 128 + signal.SIGTERM, text[-3000:]
    assert took < 6, text[-3000:]  # the slow save had 10 s left
    assert "a second signal (SIGTERM): ending now without a checkpoint" in text
    assert latest == "step_00000002"


def test_a_save_past_the_grace_ends_the_run_and_latest_keeps_the_previous(world_dir, tmp_path):
    def once(proc, lines):
        start = time.monotonic()
        proc.send_signal(signal.SIGUSR1)
        return start

    code, took, text, latest = _ended(world_dir, tmp_path, ["--checkpoint.signal_grace_s", "2"], once)
    assert code == 128 + signal.SIGUSR1, text[-3000:]
    assert 2 <= took < 7, text[-3000:]  # the slow save would take 10 s
    assert "no checkpoint 2 s after SIGUSR1 (checkpoint.signal_grace_s): ending now without a checkpoint" in text
    assert latest == "step_00000002"


# ------------------------------------------------------------------------------ the agreement, without a run


def _store():
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", free_port(), None, True, timedelta(seconds=10))


def test_the_first_posted_stop_step_wins_and_every_rank_reads_it(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    store = _store()
    ranks = [StopRequests(rank=r, world_size=3, store=store, grace_s=0) for r in range(3)]
    cpu = torch.device("cpu")
    assert [r.stop_step(4, cpu) for r in ranks] == [None, None, None]  # no signal: each step one store read
    ranks[2].signum = signal.SIGUSR1  # as its listener records it
    ranks[0].signum = signal.SIGTERM
    at = 5 + RUN_AHEAD + 2
    assert ranks[2].stop_step(5, cpu) == at  # posted: far enough ahead that no host has passed it
    assert ranks[0].stop_step(6, cpu) == at  # its own signal came later: the first post stands
    assert ranks[1].stop_step(5, cpu) == at and ranks[1].stop_step(6, cpu) == at
    assert ranks[1].signal_name == "another rank's signal" and ranks[2].signal_name == "SIGUSR1"
    assert {r.cause for r in ranks} == {"SIGUSR1 to rank 2"}
    late = StopRequests(rank=1, world_size=3, store=store, grace_s=0)  # what the bound on run-ahead rules out
    with pytest.raises(RuntimeError, match=f"past the agreed stop step {at}"):
        late.stop_step(at + 1, cpu)


def test_one_rank_stops_at_the_step_it_is_on_and_signals_together_count_once(monkeypatch):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)  # a second signal would end this process (pytest's)
    monkeypatch.setattr(preemption, "_end_workers", lambda: None)  # and pytest's children
    before = signal.getsignal(signal.SIGINT)  # Python's Ctrl-C handler, or SIG_IGN in a shell's background job
    stop, cpu = StopRequests(rank=0, world_size=1, grace_s=0).install(), torch.device("cpu")
    try:
        assert stop.stop_step(3, cpu) is None
        os.kill(os.getpid(), signal.SIGINT)  # a terminal's Ctrl-C: no KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # its launcher forwarding it: the same request
        deadline = time.monotonic() + 10
        while stop.signum is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # the listener has read both
        assert stop.stop_step(3, cpu) == 3 and stop.signal_name == "SIGINT" and exits == []
        stop.saved()
        os.kill(os.getpid(), signal.SIGTERM)  # once saved, any signal: the exit, at once, with 75
        while not exits and time.monotonic() < deadline:
            time.sleep(0.01)
        assert exits == [EXIT_CODE]
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_handlers_are_installed_from_the_main_thread_only():
    stops = []
    thread = threading.Thread(target=lambda: stops.append(StopRequests(rank=0, world_size=1, grace_s=0).install()))
    thread.start()
    thread.join()
    assert stops[0]._previous == {}


def test_resume_auto_starts_a_first_run_from_step_0_and_latest_insists_on_a_checkpoint(
    single_rank, world_dir, tmp_path, capsys
):
    from fastclip.cli import parse_args
    from fastclip.errors import ConfigError
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path / "run", steps=2) + ["--data.val_shards", "null"]
    with pytest.raises(ConfigError, match=r"resume latest: .* holds no checkpoint .* --checkpoint.resume auto"):
        Trainer(parse_args(args + ["--checkpoint.resume", "latest"]), single_rank)
    trainer = Trainer(parse_args(args + ["--checkpoint.resume", "auto"]), single_rank)
    try:
        assert trainer.step == 0
    finally:
        trainer.close()
    assert f"checkpoint.resume auto: no checkpoint in {tmp_path / 'run' / 'checkpoints'} yet" in capsys.readouterr().out


def _worker(ready) -> None:
    """A loader worker's life: its init, then work until ended."""
    preemption.worker_signals()
    ready.set()
    time.sleep(60)


def test_a_worker_ignores_a_stop_signal_while_its_rank_stops_and_ends_on_any_other_sigterm():
    import multiprocessing

    stop = StopRequests(rank=0, world_size=1, grace_s=0).install()  # RUNNING: a SIGTERM is the DataLoader's own
    fork = multiprocessing.get_context("fork")
    ready = [fork.Event(), fork.Event()]
    first, second = (fork.Process(target=_worker, args=(r,), daemon=True) for r in ready)
    try:
        first.start(), second.start()
        assert all(r.wait(timeout=30) for r in ready)  # both past their init
        os.kill(first.pid, signal.SIGTERM)
        first.join(timeout=10)
        assert first.exitcode == -signal.SIGTERM  # after waiting SAME_SIGNAL_S for its rank to say it stops
        assert stop.signum is None  # the worker's signal is not its rank's (no shared wakeup pipe)
        preemption._set(preemption.STOPPING)
        os.kill(second.pid, signal.SIGTERM)
        second.join(timeout=2 * SAME_SIGNAL_S)
        assert second.is_alive()  # the rank finishes its step with it
        preemption._set(preemption.ENDED)
        os.kill(second.pid, signal.SIGTERM)  # the rank's exit: the interpreter's terminate() must end it
        second.join(timeout=10)
        assert second.exitcode == -signal.SIGTERM
    finally:
        stop.close()
        for proc in (first, second):
            proc.kill()


def test_every_rank_resumes_the_checkpoint_rank_0_reads_in_latest(monkeypatch, tmp_path):
    """A node whose view of the shared checkpoint folder is stale (no 'latest' yet, or an older one) resumes
    what rank 0 reads; each rank reading for itself would start one rank fresh and hang the first collective."""
    from fastclip.checkpoint import locate
    from fastclip.errors import ConfigError
    from fastclip.world import World

    monkeypatch.setenv("WORLD_SIZE", "2")
    import torch.distributed as dist

    cpu = torch.device("cpu")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "latest").write_text("global_step8")
    (tmp_path / "stale").mkdir()  # rank 1's view: the same folder before 'latest' reached this node

    def both(where: str) -> list:
        roots = {0: tmp_path / "fresh", 1: tmp_path / "stale"}
        host = _store()  # a run's: one resume
        stores = [host, dist.TCPStore("127.0.0.1", host.port, None, False, timedelta(seconds=10))]  # a client each
        got: list = [None, None]

        def rank(r: int) -> None:
            try:
                got[r] = locate(roots[r], where, World(r, 2, r, cpu, store=stores[r]))
            except ConfigError as e:
                got[r] = e

        threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
        [t.start() for t in threads]
        [t.join(20) for t in threads]
        return got

    assert both("auto") == [tmp_path / "fresh" / "global_step8"] * 2
    (tmp_path / "fresh" / "latest").unlink()
    (tmp_path / "stale" / "latest").write_text("global_step4")  # a node showing an older one
    assert both("auto") == [None, None]
    errors = both("latest")
    assert all(isinstance(e, ConfigError) and "holds no checkpoint" in str(e) for e in errors), errors


def test_a_signal_in_the_last_step_saves_without_the_end_and_the_requeued_job_does_the_end(
    single_rank, world_dir, tmp_path, capsys
):
    """The end's eval and export could outlast the grace: a signal that lands in the last step stops the run as
    any other (one checkpoint, exit 75); the requeued job, at the last step already, evaluates and exports and
    leaves that checkpoint as it found it."""
    from fastclip.cli import parse_args
    from fastclip.preemption import Preempted
    from fastclip.trainer import Trainer

    out = tmp_path / "run"
    args = small_run_args(world_dir, out, steps=3) + ["--checkpoint.resume", "auto", "--eval.every", "1000"]
    trainer = Trainer(parse_args(args), single_rank)
    stop = StopRequests(rank=0, world_size=1, grace_s=0)
    asked = stop.stop_step

    def landing_in_the_last_step(step, device):
        if step == trainer.total_steps:
            stop.signum = signal.SIGTERM  # after the loop's last look at the requests
        return asked(step, device)

    stop.stop_step = landing_in_the_last_step
    try:
        with pytest.raises(Preempted, match="stopped at step 3 on SIGTERM"):
            trainer.train(stop)
    finally:
        trainer.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3] and not any("val/samples" in r for r in records)
    assert _latest_step(out) == 3 and not list(out.rglob("open_clip.pt"))
    saved = {p: p.stat().st_mtime_ns for p in (out / "checkpoints" / "step_00000003").rglob("*") if p.is_file()}

    requeued = Trainer(parse_args(args), single_rank)
    try:
        assert requeued.step == 3
        metrics = requeued.train()
    finally:
        requeued.close()
    assert "val/samples" in metrics and list(out.rglob("open_clip.pt"))
    assert "is this run's last step; what is left is its end (eval, export)" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in saved} == saved and _latest_step(out) == 3
