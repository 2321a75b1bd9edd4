"""Shard specs (globs, brace ranges, '::' lists) resolved to the tar files a loader reads, damaged ones set aside.

A shard that does not exist, is not a tar or is empty is a mistake in the spec: an error names it. A shard that
is damaged (truncated by an interrupted copy or download, a header that does not parse) is what a web-scale
set always holds a few of: it is skipped, named in the log with what is wrong, and counted; past
``data.max_bad_fraction`` of the shards the run stops, since that many points at the data, not at a few files.
Remote shards (fastclip/data/remote.py) are named by brace ranges and checked with a request each for the first
and the last; they are counted only from the index tool's files, or downloaded when there are a few.

Why one module: expanding a spec, checking its shards and counting them are one decision, which shards an epoch
reads and how many samples they hold; each step depends on what the one before found (a damaged shard is not
counted, a counted one need not be walked).
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
from fastclip.data.remote import DEFAULT, RemotePolicy, display, is_remote, list_glob, open_shard
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
    if is_remote(pattern):
        return _remote_matches(pattern, field=field, where=where)
    # a plain path is checked when opened (a folder, a missing file): a stat each here would be 40,000 at scale
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
        raise ConfigError(
            f"{field}: {pattern!r}{where} matches no file. Check the path, or quote the glob in the shell."
        )
    return matches


def _remote_matches(pattern: str, *, field: str, where: str) -> list[str]:
    """A remote pattern as it is (brace ranges name remote shards without listing anything); an S3 glob is listed,
    and the log says so, since listing a bucket of 40,000 objects takes a while."""
    if pattern.startswith("pipe:") or not glob.has_magic(pattern):
        return [pattern]
    if not pattern.startswith("s3://"):
        raise ConfigError(f"{field}: {display(pattern)}{where} is a glob over HTTP, which cannot be listed: name the "
                          "shards with a brace range, e.g. https://host/shards/{00000..00099}.tar")  # fmt: skip
    say_once(field, f"{field}: listing {display(pattern)} (a brace range names the shards without a listing)")
    try:
        matches = list_glob(pattern)
    except OSError as e:
        raise ConfigError(f"{field}: cannot list {display(pattern)}{where}: {e}") from None
    if not matches:
        raise ConfigError(f"{field}: {display(pattern)}{where} matches no object. Check the bucket and prefix.")
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


def _check_remote(path: str, *, field: str, spec: str, policy: RemotePolicy) -> None:
    """A remote shard exists, can be read with the credentials found, and starts with a tar header."""
    try:
        with open_shard(path, policy) as f:
            head = f.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.TarError:
        raise ConfigError(f"{field}: shard {display(path)} (from {display(spec)}) does not start with a tar header"
                          "; is it a webdataset tar?") from None  # fmt: skip
    except OSError as e:
        raise ConfigError(f"{field}: cannot read shard {display(path)} (from {display(spec)}): {e}") from None


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
        with open_shard(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            groups = list(member_groups(itertools.islice(tar, members)))
    except (tarfile.TarError, OSError):  # a layout or a read the loader's own read will name
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
    check: int | None = STARTUP_CHECKS, policy: RemotePolicy = DEFAULT,
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
    remote = [p for p in paths if is_remote(p)]
    if remote:  # a request (a command) each: the first and the last, the rest when read
        opened = (opened - set(remote)) | set(_spread(remote, min(check or 2, 2))) | set(walk_these)
        _uncounted_remote(walk_these, field=field)
    for path in paths:
        if path not in opened or path in damaged:
            continue
        if is_remote(path):
            _check_remote(path, field=field, spec=spec, policy=policy)
            _check_index_readable(indexed.get(path), field=field)
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


REMOTE_WALK = 16  # remote shards counted by downloading them, at most: more is a transfer, not a start-up


def _uncounted_remote(paths: list[str], *, field: str) -> None:
    """Remote shards to count from their tar headers: downloaded, which is fine for a val set and not for a
    bucket of training data."""
    remote = [p for p in paths if is_remote(p)]
    if not remote:
        return
    how = (f"index them once (python -m fastclip.data.shards index '{display(remote[0])}' --index-dir DIR, then "
           "--data.index_dir DIR)")  # fmt: skip
    if len(remote) > REMOTE_WALK:
        raise ConfigError(
            f"{field}: {len(remote)} remote shards (e.g. {display(remote[0])}) have no sample counts here, and "
            f"counting them would download them all at start-up. Set data.train_num_samples (training), or {how}."
        )
    say_once(field, f"{field}: counting the samples of {counted(len(remote), 'remote shard')} by downloading "
             f"them (e.g. {display(remote[0])}); to start without, {how}")  # fmt: skip


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
