"""The checkpoint folder's pointer: ``latest`` names the newest complete ``step_XXXXXXXX`` folder.

fastclip writes ``latest`` itself rather than through DeepSpeed: DeepSpeed's rank 0 writes it before the final
barrier of ``save_checkpoint``, so with a slow rank (a shared filesystem under load) ``latest`` could name a
folder whose other ranks' files were still being written, and a kill then left a checkpoint that does not
load. Here it moves only after every rank has returned from the save, and atomically: a temporary file,
fsync, rename, fsync of the folder, so a crash leaves either the old name or the new one, never half of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fastclip.config import ConfigError

LATEST = "latest"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed; raised on the rank that meets it (each rank loads its own files)."""


def read_latest(root: str | Path) -> str | None:
    """The tag ``latest`` names in ``root``, or None when there is no checkpoint yet."""
    path = Path(root) / LATEST
    return path.read_text().strip() if path.is_file() else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_latest(root: str | Path, tag: str) -> None:
    """Point ``latest`` at ``root/tag``; call on one rank, after a barrier that follows every rank's save.

    The tag folder's files are flushed first, so that ``latest`` never outlives the data it names after a power
    loss (on a network filesystem, closing a file already made it visible to every node; the fsync is then
    cheap)."""
    root = Path(root)
    folder = root / tag
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(folder)
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync(root)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return flat


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'section.field old -> new' for every config field that differs between a checkpoint's config and this
    run's (``checkpoint.resume`` left out: it is how a resume differs by definition)."""
    old, new = _flatten(saved), _flatten(current)
    return [
        f"{key} {old.get(key)!r} -> {new.get(key)!r}"
        for key in sorted(old.keys() | new.keys())
        if key != "checkpoint.resume" and old.get(key) != new.get(key)
    ]
