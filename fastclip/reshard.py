"""A checkpoint resumed on another number of ranks (or ZeRO stage): DeepSpeed's universal format.

DeepSpeed's ZeRO checkpoints hold one optimizer partition per rank, so they load only on the world size that
wrote them. Its universal format (``deepspeed.checkpoint.ds_to_universal``) stores each parameter's fp32 master
and Adam moments whole; any world size loads it. Rank 0 converts a step folder once, into
``checkpoint.dir/universal/step_XXXXXXXX`` (a temporary folder renamed, marked ``.complete``), in a subprocess
with a worker per CPU (a large checkpoint is thousands of files; the subprocess and its workers end with rank 0,
however it ends: :func:`run_tied`), while the other ranks wait for its verdict on
the rendezvous store rather than in a collective whose timeout the conversion could outlast; the watchdog still
ends them if rank 0 dies meanwhile.

What DeepSpeed 0.19 converts: ZeRO-1/2 checkpoints for ZeRO-1/2, ZeRO-3 ones for ZeRO-3. A ZeRO-0 checkpoint holds
its optimizer whole (no partitions, fp32 or bf16) and loads on any world size as it is. Other changes are refused
before anything loads, saying what to do.

The same conversion resumes a ZeRO-1/2 checkpoint whose optimizer holds the parameters in other groups than this
run's (fastclip/model.py's param_group_names: checkpoints from before the aligned layout, or another
optim.decay_rule): the universal format keeps each parameter's state by name, and both layouts have the same two
groups, decay and no decay, which DeepSpeed pairs by position.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from fastclip.console import say
from fastclip.errors import ConfigError

UNIVERSAL = "universal"  # checkpoint.dir/universal/<tag>


class ReshardError(ConfigError):
    """A checkpoint that cannot resume on this run's world size or ZeRO stage."""


def describe(meta: dict) -> str:
    return f"{meta['world_size']} ranks, ZeRO-{meta['zero_stage']}, {meta['precision']}"


def check_convertible(folder: Path, saved: dict, now: dict, *, regroup: str | None = None) -> bool:
    """Whether ``folder`` (saved as ``saved``) needs the universal format to resume as ``now``; raises when it
    cannot resume at all. ``regroup``: the flags that give the checkpoint's parameter groups, when they are not this
    run's (None when they are)."""
    if regroup is not None and {saved["zero_stage"], now["zero_stage"]} - {1, 2}:
        raise ReshardError(
            f"checkpoint.resume: {folder} holds its optimizer's state in other parameter groups than this run builds "
            f"(written before fastclip aligned them, or with another optim.decay_rule); DeepSpeed regroups only "
            f"ZeRO-1/2 checkpoints. Resume with {regroup}."
        )
    same = (saved["world_size"], saved["zero_stage"]) == (now["world_size"], now["zero_stage"])
    if same:
        return regroup is not None
    hint = (f"export its weights (python -m fastclip.export {folder} --out FILE) and start from them with "
            "--model.pretrained")  # fmt: skip
    if 0 in (saved["zero_stage"], now["zero_stage"]):  # ZeRO-0's optimizer is whole: any world size, no conversion
        if saved["zero_stage"] == now["zero_stage"] and saved["precision"] == now["precision"]:
            return False
        raise ReshardError(
            f"checkpoint.resume: {folder} ({describe(saved)}) cannot resume on this run ({describe(now)}): a ZeRO-0 "
            f"checkpoint resumes at ZeRO-0 in its precision, on any number of ranks. Resume with --train.zero_stage "
            f"{saved['zero_stage']} --train.precision {saved['precision']}, or {hint}."
        )
    if (saved["zero_stage"] == 3) != (now["zero_stage"] == 3):
        # DeepSpeed 0.19 writes ZeRO-3's universal folders for ZeRO-3 alone (flat tensors, per-rank model states)
        raise ReshardError(
            f"checkpoint.resume: {folder} ({describe(saved)}) cannot resume on this run ({describe(now)}): "
            "DeepSpeed's universal format converts ZeRO-3 checkpoints for ZeRO-3 only, and ZeRO-1/2 ones for "
            f"ZeRO-1/2 (any number of ranks either way). Resume with --train.zero_stage "
            f"{3 if saved['zero_stage'] == 3 else saved['zero_stage']}, or {hint}."
        )
    return True


def universal_source(folder: Path, root: Path, *, rank: int, store, key: str) -> Path:
    """The universal conversion of ``folder``, made by rank 0 (once) while the other ranks wait on ``store``."""
    target = root / UNIVERSAL / folder.name
    if rank == 0:
        try:
            if not (target / ".complete").is_file():
                to_universal(folder, target)
            store.set(key, "ok")
        except ReshardError as e:
            store.set(key, str(e))
            raise
        return target
    store.wait([key], timedelta(days=1))  # the watchdog ends this rank if rank 0 dies meanwhile
    verdict = store.get(key).decode()
    if verdict != "ok":
        raise ConfigError(verdict)  # said once, by rank 0
    deadline = time.monotonic() + 120  # a network filesystem may show rank 0's rename to other nodes late
    while not (target / ".complete").is_file():
        if time.monotonic() > deadline:
            raise ReshardError(f"checkpoint.resume: rank 0 converted {folder} into {target}, which this node does "
                               "not see after 120 s: is checkpoint.dir on storage every node shares?")  # fmt: skip
        time.sleep(1)
    return target


def to_universal(folder: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal of ``folder`` into ``target``, atomically; its output said only if it fails."""
    say(f"checkpoint: converting {folder} to DeepSpeed's universal format in {target} (once)")
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = max(1, min(os.cpu_count() or 1, 16))
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
        "--input_folder",
        str(folder),
        "--output_folder",
        str(tmp),
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 4)),
        "--inject_missing_state",
    ]  # folders saved before fastclip gave the module its universal_checkpoint_info
    proc = run_tied(cmd)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or ["no output"]
        raise ReshardError(
            f"checkpoint.resume: DeepSpeed could not convert {folder} to its universal format ({said[0][:300]}); "
            "resume on the world size and ZeRO stage it was saved with."
        )
    (tmp / ".complete").write_text("")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def run_tied(cmd: list[str]) -> subprocess.CompletedProcess:
    """``cmd`` run to its end, its output captured, without outliving this process. A supervisor (:func:`_supervise`)
    starts it in a process group of their own, which goes whole, ``cmd``'s workers included: when this
    process dies, even by SIGKILL (the supervisor's parent-death signal, Linux), or stops waiting (an exception,
    Ctrl-C). A conversion left running would go on writing into checkpoint.dir beside the next run's."""
    package_root = str(Path(__file__).resolve().parents[1])  # this fastclip, whatever the child's path would find
    code = f"import sys; sys.path.insert(0, {package_root!r}); from fastclip.reshard import _supervise; _supervise()"
    supervised = [sys.executable, "-c", code, str(os.getpid()), *cmd]
    proc = subprocess.Popen(supervised, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate()
    except BaseException:
        _end_group(proc.pid)  # before the wait: unreaped, the supervisor's pid (the group's id) cannot be reused
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _end_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGKILL)


def _die_with(parent: int) -> None:
    """Have the kernel send this process SIGTERM when ``parent`` dies (prctl's PR_SET_PDEATHSIG; Linux only), and
    end this process group on SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: _end_group(0))
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the signal was asked for
        _end_group(0)


def _supervise() -> None:
    """The supervisor of :func:`run_tied` (argv: the parent's pid, then the command): the command in this process
    group (its stdout and stderr are the parent's pipes), ended with it when the parent dies; exits as it did."""
    _die_with(int(sys.argv[1]))
    sys.exit(subprocess.Popen(sys.argv[2:]).wait())
