"""Shard specs (globs, brace ranges, '::' lists) resolved to files that exist and open as tar archives."""

from __future__ import annotations

import glob
import tarfile
from pathlib import Path

from braceexpand import braceexpand

from fastclip.config import ConfigError


def expand(spec: str) -> list[str]:
    """'a/{000..003}.tar::b/*.tar' -> the matching paths, in order, each pattern expanded once."""
    paths: list[str] = []
    for part in spec.split("::"):
        for pattern in braceexpand(part.strip()):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            paths.extend(matches)
    return paths


def resolve_shards(spec: str, *, field: str) -> list[str]:
    """Every shard of ``spec``, checked to exist and to open as a tar; errors name ``field`` and the file."""
    paths = expand(spec)
    if not paths:
        raise ConfigError(f"{field}: {spec!r} matches no file. Check the path, or quote the glob in the shell.")
    for path in paths:
        if not Path(path).is_file():
            raise ConfigError(f"{field}: shard {path!r} does not exist (from {spec!r})")
        try:
            with tarfile.open(path, "r:") as tar:
                first = tar.next()
        except (tarfile.TarError, OSError) as e:
            raise ConfigError(
                f"{field}: shard {path!r} is not a readable tar archive ({e}). Remove or re-create it."
            ) from e
        if first is None:
            raise ConfigError(f"{field}: shard {path!r} is an empty tar archive. Remove it from {spec!r}.")
    return paths


def index_paths(paths: list[str]) -> list[str] | None:
    """DALI index files ('shard.idx' beside 'shard.tar') when every shard has one, else None."""
    idx = [str(Path(p).with_suffix(".idx")) for p in paths]
    return idx if all(Path(p).is_file() for p in idx) else None
