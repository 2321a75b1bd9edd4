"""The folders a run writes (``checkpoint.dir``, ``log.dir``): writable before any model is built, held by one run
at a time, and measured for room before each save.

A run that cannot write its folder used to train to the end and lose everything at the first save; two runs
started on one folder wrote the same step folders and interleaved metrics.jsonl without a word. The lock is an
advisory ``flock`` on ``.fastclip.lock`` in each folder, held by global rank 0 for the whole run: the kernel drops
it when the process dies, however it dies, so a stale lock cannot outlive its run; the file's text (host, pid,
start) names the holder to a second run, and is cleared at a clean exit, so a leftover text means a run that died.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from fastclip.errors import ConfigError

LOCK = ".fastclip.lock"


def human(n: float) -> str:
    """Bytes as people read them: '1.4 GB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_writable(path: str | Path, field: str) -> None:
    """:class:`ConfigError` unless ``path`` (created if missing) takes a new file: a read-only mount, a folder of
    another user or a file in its place is found here, not at the first save after hours of training."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fastclip-write-check-"):
            pass
    except OSError as e:
        raise ConfigError(
            f"{field}: cannot write to {folder} ({e.strerror or e}): the run would train and then lose what it "
            f"saves there. Point --{field} at a writable folder."
        ) from None


def free_bytes(path: str | Path) -> int:
    """Free bytes on the filesystem of ``path`` (or of its nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def folder_bytes(folder: Path) -> int:
    """The bytes of every file under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def is_out_of_space(error: BaseException) -> bool:
    """An error of a write that ran out of room: ENOSPC/EDQUOT, or torch's own words for a short write."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(error)
    return "unexpected pos" in text or "No space left" in text or "File too large" in text


class RunLock:
    """One run's hold on its folders (see the module doc). ``acquire`` raises :class:`ConfigError` naming the run
    that holds one; ``notes`` says what the log should (a dead run's lock taken over, a folder it cannot lock)."""

    def __init__(self, folders: dict[str, str | Path]):
        self.folders = {field: Path(f) for field, f in folders.items()}
        self.files: list = []
        self.notes: list[str] = []
        # loader workers forked later would inherit the descriptors, and with them the lock after this process dies
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        """In a forked child: point its copies of the lock descriptors at /dev/null (an flock belongs to the open
        file, which parent and child share: unlocking here would unlock the parent, closing would leave the file
        object to fail at its finalization)."""
        for f in self.files:
            with contextlib.suppress(OSError):
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, f.fileno())
                os.close(null)
        self.files = []

    def acquire(self) -> RunLock:
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        seen: set[Path] = set()
        try:
            for field, folder in self.folders.items():
                if folder.resolve() in seen:
                    continue
                seen.add(folder.resolve())
                self._take(field, folder, me)
        except BaseException:
            self.release()
            raise
        return self

    def _take(self, field: str, folder: Path, me: dict) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        f = open(folder / LOCK, "a+")  # noqa: SIM115 - held open for the run: the lock lives with the descriptor
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            f.seek(0)
            holder = _holder(f.read())
            f.close()
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # a filesystem without flock
                self.notes.append(f"{folder} is not locked ({e.strerror}): its filesystem has no flock, so a second "
                                  "run on it would not be noticed")  # fmt: skip
                return
            raise ConfigError(
                f"{field}: {folder} is in use by another run ({holder}): two runs writing one folder overwrite each "
                f"other's checkpoints and logs. Wait for it to end, stop it, or give this run another --{field}."
            ) from None
        f.seek(0)
        if stale := f.read().strip():
            self.notes.append(f"took over {folder} (held by {_holder(stale)}, which ended without releasing it)")
        f.seek(0)
        f.truncate()
        f.write(json.dumps(me))
        f.flush()
        self.files.append(f)

    def release(self) -> None:
        """Clear the holder's text (a clean end) and let go."""
        for f in self.files:
            try:
                f.seek(0)
                f.truncate()
                f.close()
            except OSError:
                pass
        self.files = []


def _holder(text: str) -> str:
    try:
        who = json.loads(text)
        return f"host {who['host']}, pid {who['pid']}, started {who['started']}"
    except (ValueError, KeyError, TypeError):
        return "a run that did not say who it is"


def written_folders(cfg) -> dict[str, str]:
    """The folders ``cfg``'s run writes, by field: a benchmark writes its report to log.dir, and nothing to
    checkpoint.dir unless it resumes (which may convert a checkpoint there, or move ``latest``)."""
    saves = not (cfg.train.benchmark or cfg.train.benchmark_try) or cfg.checkpoint.resume
    return {"log.dir": cfg.log.dir, **({"checkpoint.dir": cfg.checkpoint.dir} if saves else {})}


def write_failed(error: BaseException) -> bool:
    """Whether ``error``, raised while writing a file, is the write failing (an OSError, or torch's file writer's
    own errors: a file it cannot open, a short write) rather than a bug to raise as it is."""
    return isinstance(error, OSError) or is_out_of_space(error) or "inline_container.cc" in str(error)


def hold(cfg, world) -> RunLock | None:
    """Global rank 0 locks the run's folders; every rank hears its verdict, so that all stop alike (before any
    model) when another run holds them."""
    from fastclip.console import say
    from fastclip.world import agree

    lock, refused = None, ""
    if world.is_main:
        try:
            lock = RunLock(written_folders(cfg)).acquire()
            for said in lock.notes:
                say(f"run lock: {said}")
        except ConfigError as e:
            refused = str(e)
        except OSError as e:  # the lock file itself (another user's, a folder in its place)
            refused = f"cannot lock the run's folders ({e}): give this run folders of its own"
    if refused := agree(world, "run folders held", refused):
        raise ConfigError(refused)
    return lock


def bytes_per_save(params: int, previous: Path | None) -> int:
    """About what one checkpoint of the run takes: the size of its previous one, or before the first, 16 bytes a
    parameter (its weight, an fp32 master copy and Adam's two moments)."""
    if previous is not None and previous.is_dir():
        return folder_bytes(previous)
    return 16 * params


def short_of_room(folder: str | Path, need: int, what: str) -> str | None:
    """Why ``what`` (``need`` bytes) will not fit in ``folder`` (None when it will, with 5% to spare)."""
    free = free_bytes(folder)
    if free >= need * 1.05:
        return None
    return f"{what} needs about {human(need)} in {folder}, which has {human(free)} free"
