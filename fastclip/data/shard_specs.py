"""Shard specs (globs, brace ranges, '::' lists) resolved to the tar files a loader reads, damaged ones set aside.

A shard that does not exist, is not a tar or is empty is a mistake in the spec: an error names it. A shard that
is damaged (truncated by an interrupted copy or download, a header that does not parse) is what a web-scale
set always holds a few of: it is skipped, named in the log with what is wrong, and counted; past
``data.max_bad_fraction`` of the shards the run stops, since that many points at the data, not at a few files.
"""

from __future__ import annotations

import glob
import itertools
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from fastclip.console import counted
from fastclip.data.skips import log
from fastclip.data.tar_layout import (
    IMAGE_EXTS,
    OTHER_IMAGE_EXTS,
    _walk_damage,
    damage,
    gzipped,
    member_groups,
    usable,
    walk,
)
from fastclip.errors import ConfigError


def _matches(pattern: str, *, field: str, spec: str) -> list[str]:
    where = f" (part of {spec!r})" if pattern != spec else ""
    if not pattern:
        raise ConfigError(f"{field}: {spec!r} has an empty part (a '::' at its start or end, or two in a row)")
    # a plain path is checked when opened (a folder, a missing file): a stat each here would be 40,000 at scale
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
        raise ConfigError(
            f"{field}: {pattern!r}{where} matches no file. Check the path, or quote the glob in the shell."
        )
    return matches


def expand(spec: str, *, field: str = "shards") -> list[str]:
    """'a/{000..003}.tar::b/*.tar' -> the matching paths, in order; a glob part that matches nothing is an error
    (alone or in a list: a list whose part went missing would silently train on less data)."""
    paths = [m for part in spec.split("::") for pattern in braceexpand(part.strip())
             for m in _matches(pattern, field=field, spec=spec)]  # fmt: skip
    repeated = sorted(p for p, n in Counter(map(os.path.normpath, paths)).items() if n > 1)  # 'a/x' and './a/x' too
    if repeated:
        say_once(field, f"{field}: {len(repeated)} shards are listed more than once (e.g. {repeated[0]}): their "
                  "samples are read that many times per epoch")  # fmt: skip
    return paths


def shard_list_digest(spec: str, *, field: str = "shards") -> tuple[int, str]:
    """How many files ``spec`` matches here and a hash of their paths: the list itself, which a glob does not
    pin (shards added since, another node's older copy)."""
    import hashlib

    listed = expand(spec, field=field)
    return len(listed), hashlib.sha1("\n".join(listed).encode()).hexdigest()[:16]


def _check_opens(path: str, *, field: str, spec: str) -> None:
    if Path(path).is_dir():
        raise ConfigError(f"{field}: {path!r} (from {spec!r}) is a folder; name its shards, e.g. '{path}/*.tar'")
    if not Path(path).is_file():
        raise ConfigError(f"{field}: shard {path!r} does not exist (from {spec!r})")
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError) as e:
        if gzipped(path):
            raise ConfigError(f"{field}: shard {path!r} is gzip-compressed: webdataset shards for fastclip are plain "
                              "tars (gunzip it, and name it .tar)") from None  # fmt: skip
        raise ConfigError(f"{field}: shard {path!r} is not a readable tar archive ({e}). Remove or re-create it") from e
    if first is None:
        raise ConfigError(f"{field}: shard {path!r} is an empty tar archive. Remove it from {spec!r}.")


_said: set[tuple[str, str]] = set()  # (field, message) already logged by this process: check and loader alike


def say_once(field: str, message: str, *, about: tuple = ()) -> None:
    if os.environ.get("RANK", "0") == "0" and (field, message, about) not in _said:
        _said.add((field, message, about))
        log.warning("%s", message)


def _set_aside(damaged: dict[str, str], *, total: int, field: str, max_bad_fraction: float) -> None:
    """Log each damaged shard, or stop when more than ``max_bad_fraction`` of the shards are damaged."""
    if not damaged:
        return
    if len(damaged) > max_bad_fraction * total:
        listing = "; ".join(f"{path}: {why}" for path, why in damaged.items())
        raise ConfigError(
            f"{field}: {len(damaged)} of {total} shards are damaged, more than data.max_bad_fraction="
            f"{max_bad_fraction} allows. {listing}. Re-create them, remove them from the spec, or raise "
            "--data.max_bad_fraction to train without them."
        )
    for path, why in damaged.items():
        say_once(field, f"skipped shard {path}: {why}")
    summary = f"{field}: {len(damaged)} of {total} shards skipped as damaged (limit: {max_bad_fraction:.1%})"
    say_once(field, summary, about=tuple(damaged))


def _say_other_formats(field: str, keys: list[tuple[str, str]], *, probed: bool) -> None:
    if not keys:
        return
    shard, key = keys[0]
    scope = "among the first samples of the first shard" if probed else "in all"
    say_once(
        field,
        f"{field}: {len(keys)} samples {scope} have their image in a format fastclip does not decode (e.g. {key} in "
        f"{shard}); they are left out. Re-encode them as one of {', '.join(IMAGE_EXTS)}.",
    )


def _probe_formats(path: str, members: int = 128) -> list[tuple[str, str]]:
    """Samples among a shard's first ``members`` tar members whose image only comes in another format."""
    try:
        with tarfile.open(path, "r:") as tar:
            groups = list(member_groups(itertools.islice(tar, members)))
    except tarfile.TarError:  # a layout the loader's own read will name
        return []
    return [(path, f"{key}.{sorted(set(g) & set(OTHER_IMAGE_EXTS))[0]}") for key, g in groups
            if "txt" in g and set(g) & set(OTHER_IMAGE_EXTS) and not usable(g)]  # fmt: skip


@dataclass
class Shards:
    paths: list[str]  # the shards to read, damaged ones left out
    samples: list[int] | None  # usable samples in each, when every one is counted (index tool's files, or a walk)
    index: list[str | None]  # each shard's index file, or None
    indexed_bytes: list[int | None]  # each shard's size when it was indexed, where the index tool recorded it
    counted_from: str = ""  # where the counts came from ('sizes.json', 'tar headers', ...; '' when not counted)

    @property
    def total(self) -> int | None:
        return None if self.samples is None else sum(self.samples)


STARTUP_CHECKS = 64  # DataConfig.check_shards's default: shards opened at start-up when there are more
SLOW_WALK = 100  # shards: counting more of them from tar headers is worth a line saying how to avoid it


def _spread(paths: list[str], n: int | None) -> list[str]:
    """``n`` of ``paths``: the first, the last and evenly between (all when there are no more)."""
    if n is None or len(paths) <= n:
        return paths
    if n == 1:
        return paths[:1]
    return [paths[round(i * (len(paths) - 1) / (n - 1))] for i in range(n)]


def _check_index_readable(idx: str | None, *, field: str) -> None:
    if idx is None:
        return
    try:
        with open(idx, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{field}: cannot read the index file {idx} ({e.strerror}): make it readable (chmod a+r) "
                          "or re-run the index tool") from None  # fmt: skip


def _changed(path: str, indexed: int | None) -> None:
    if indexed is not None and (size := os.path.getsize(path)) != indexed:
        raise ConfigError(
            f"shard {path} is {size} bytes, {indexed} when it was indexed: its index points into another file. "
            f"Re-run `python -m fastclip.data.shards index {path}`."
        )


def _known(paths: list[str], *, field: str, index_dir: str | None):
    from fastclip.data.index import known_counts

    if index_dir and not os.path.isdir(index_dir):
        raise ConfigError(f"data.index_dir: {index_dir!r} is not a folder; give the --index-dir the index tool wrote")
    try:
        return known_counts(paths, index_dir)
    except ValueError as e:
        raise ConfigError(f"{field}: {e}") from None


def resolve_shards(
    spec: str, *, field: str, max_bad_fraction: float = 0.0, count: bool = False, index_dir: str | None = None,
    check: int | None = STARTUP_CHECKS,
) -> Shards:  # fmt: skip
    """The readable shards of ``spec``, and their sample counts where the index tool's files give them.

    ``check`` shards (all when None, or when there are fewer) are opened here: each must exist and open as a
    non-empty tar (else an error names it) and not have changed since it was indexed; a damaged one is skipped
    and logged, and past ``max_bad_fraction`` the run stops. The others are checked by the loader when it first
    reads them. With ``count``, the shards the index tool's files do not count have their tar headers walked
    (slow on many shards: the log says so, and how to avoid it)."""
    paths = expand(spec, field=field)
    known = _known(paths, field=field, index_dir=index_dir)
    damaged: dict[str, str] = dict(known.bad)
    indexed = known.indexed
    walk_these = known.missing if count else []
    opened = set(_spread(paths, check)) | set(walk_these)  # a walk opens its tars anyway: check them first
    for path in paths:
        if path not in opened or path in damaged:
            continue
        _check_opens(path, field=field, spec=spec)
        _changed(path, known.bytes.get(path))
        _check_index_readable(indexed.get(path), field=field)
        if path not in indexed and (why := damage(path)) is not None:  # indexed: torn samples are left out
            damaged[path] = why
    counts, other = dict(known.samples), []
    if walk_these:
        walked, other = _walk_all([p for p in walk_these if p not in damaged], damaged, field=field, of=len(paths))
        counts.update(walked)
    _set_aside(damaged, total=len(paths), field=field, max_bad_fraction=max_bad_fraction)
    good = [p for p in paths if p not in damaged]
    _say_other_formats(field, other if walk_these else _probe_formats(good[0]), probed=not walk_these)
    samples = [counts[p] for p in good] if all(p in counts for p in good) else None
    walked = {p for p in walk_these if p in counts}
    sources = [f"the index tool's counts ({counted(len(good) - len(walked), 'shard')})" if len(walked) < len(good)
               else "", f"their tar headers ({counted(len(walked), 'shard')})" if walked else ""]  # fmt: skip
    counted_from = " and ".join(filter(None, sources)) if samples is not None else ""
    return Shards(good, samples, [indexed.get(p) for p in good], [known.bytes.get(p) for p in good], counted_from)


def _walk_all(paths: list[str], damaged: dict[str, str], *, field: str, of: int) -> tuple[dict[str, int], list]:
    """Every shard's usable samples from its tar headers (damaged ones into ``damaged``)."""
    if len(paths) > SLOW_WALK:
        say_once(
            field,
            f"{field}: counting the samples of {len(paths)} of {of} shards (e.g. {paths[0]}) by reading every tar "
            "header, as the index tool's sizes.json and index files do not count them: this is what makes "
            "start-up slow. Run `python -m fastclip.data.shards index SHARDS` once on them (it writes the files "
            "start-up reads instead), or set data.train_num_samples.",
        )
    counts, other = {}, []
    for path in paths:
        try:
            found = walk(path)
        except (tarfile.TarError, OSError) as e:
            damaged[path] = _walk_damage(path, e)
            continue
        counts[path] = found.usable
        other += [(path, key) for key in found.other_format]
    return counts, other
