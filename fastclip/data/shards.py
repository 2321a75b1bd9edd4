"""Shard specs (globs, brace ranges, '::' lists) resolved to the tar files a loader reads, damaged ones set aside.

A shard that does not exist, is not a tar or is empty is a mistake in the spec: an error names it. A shard that
is damaged (truncated by an interrupted copy or download, a header that does not parse) is what a web-scale
set always holds a few of: it is skipped, named in the log with what is wrong, and counted; past
``data.max_bad_fraction`` of the shards the run stops, since that many points at the data, not at a few files.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from braceexpand import braceexpand

from fastclip.config import ConfigError
from fastclip.data.skips import log

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what both loaders decode; img2dataset's encode_format choices
# images in other formats: their samples are left out, counted and named (a format the user can re-encode)
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "avif", "heic", "jxl", "jp2")
BLOCK = 512  # tar's block; an archive ends with two zero blocks


def expand(spec: str, *, field: str = "shards") -> list[str]:
    """'a/{000..003}.tar::b/*.tar' -> the matching paths, in order; a glob part that matches nothing is an error
    (alone or in a list: a list whose part went missing would silently train on less data)."""
    paths: list[str] = []
    for part in spec.split("::"):
        for pattern in braceexpand(part.strip()):
            matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if not matches:
                where = f" (part of {spec!r})" if pattern != spec else ""
                raise ConfigError(
                    f"{field}: {pattern!r}{where} matches no file. Check the path, or quote the glob in the shell."
                )
            paths.extend(matches)
    return paths


def _tail_damage(path: str) -> str | None:
    """O(1) check of a tar's end: a truncated file is rarely a whole number of blocks ending in two zero ones."""
    size = os.path.getsize(path)
    if size % BLOCK:
        return f"its size ({size} bytes) is not a whole number of {BLOCK}-byte tar blocks"
    with open(path, "rb") as f:
        f.seek(max(size - 2 * BLOCK, 0))
        if any(f.read(2 * BLOCK)):
            return "it does not end with tar's end-of-archive blocks"
    return None


@dataclass
class ShardCount:
    """What a walk of one shard's tar headers found (no payload read)."""

    usable: int = 0  # samples with an image fastclip decodes and a caption
    other_format: list[str] = dataclasses.field(default_factory=list)  # keys whose image fastclip does not decode


def _check_only_zeros_after(path: str, offset: int) -> None:
    """tarfile ends a walk quietly at a header that does not parse, as if the archive ended there: only zeros
    (the end blocks and their padding) may follow, or the rest of the shard would be lost without a word."""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 16):
            if any(chunk):
                size = os.path.getsize(path)
                raise tarfile.ReadError(f"the tar header at byte {offset} does not parse; {size - offset} bytes follow")


def walk_headers(path: str) -> ShardCount:
    """Count a shard's samples from its tar headers; raises tarfile.TarError/OSError where the tar is damaged."""
    keys: dict[str, set] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if member.isfile():
                key, _, ext = member.name.partition(".")
                keys.setdefault(key, set()).add(ext.lower())
        end = tar.offset  # where tarfile stopped: the end-of-archive blocks, or a header it could not parse
    _check_only_zeros_after(path, end)
    count = ShardCount()
    for key, exts in keys.items():
        if "txt" not in exts:
            continue
        if exts & set(IMAGE_EXTS):
            count.usable += 1
        elif exts & set(OTHER_IMAGE_EXTS):
            count.other_format.append(f"{key}.{sorted(exts & set(OTHER_IMAGE_EXTS))[0]}")
    return count


def damage(path: str) -> str | None:
    """What is wrong with a shard that exists and opens as a tar, or None. The cheap end check first; a shard that
    fails it is walked header by header, so that a tar written without end blocks but whole still counts."""
    suspect = _tail_damage(path)
    if suspect is None:
        return None
    try:
        walk_headers(path)
    except (tarfile.TarError, OSError) as e:
        return _walk_damage(path, e)
    return None


def _walk_damage(path: str, error: Exception) -> str:
    tail = _tail_damage(path)
    return f"{tail}: truncated or damaged ({error})" if tail else f"damaged: {error}"


def _check_opens(path: str, *, field: str, spec: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{field}: shard {path!r} does not exist (from {spec!r})")
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
    except (tarfile.TarError, OSError) as e:
        raise ConfigError(f"{field}: shard {path!r} is not a readable tar archive ({e}). Remove or re-create it") from e
    if first is None:
        raise ConfigError(f"{field}: shard {path!r} is an empty tar archive. Remove it from {spec!r}.")


_said: set[tuple[str, str]] = set()  # (field, message) already logged by this process: check and loader alike


def _say_once(field: str, message: str, *, about: tuple = ()) -> None:
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
        _say_once(field, f"skipped shard {path}: {why}")
    summary = f"{field}: {len(damaged)} of {total} shards skipped as damaged (limit: {max_bad_fraction:.1%})"
    _say_once(field, summary, about=tuple(damaged))


def _say_other_formats(field: str, keys: list[tuple[str, str]], *, probed: bool) -> None:
    if not keys:
        return
    shard, key = keys[0]
    scope = "among the first samples of the first shard" if probed else "in all"
    _say_once(
        field,
        f"{field}: {len(keys)} samples {scope} have their image in a format fastclip does not decode (e.g. {key} in "
        f"{shard}); they are left out. Re-encode them as one of {', '.join(IMAGE_EXTS)}.",
    )


def _probe_formats(path: str, members: int = 128) -> list[tuple[str, str]]:
    """Samples among a shard's first ``members`` tar members whose image only comes in another format."""
    names = []
    with tarfile.open(path, "r:") as tar:
        for _, member in zip(range(members), tar):
            names.append(member.name)
    exts: dict[str, set] = {}
    for name in names:
        key, _, ext = name.partition(".")
        exts.setdefault(key, set()).add(ext.lower())
    return [(path, f"{k}.{sorted(e & set(OTHER_IMAGE_EXTS))[0]}") for k, e in exts.items()
            if e & set(OTHER_IMAGE_EXTS) and not e & set(IMAGE_EXTS)]  # fmt: skip


@dataclass
class Shards:
    paths: list[str]  # the shards to read, damaged ones left out
    samples: int | None = None  # usable samples in them, when their headers were walked


def resolve_shards(spec: str, *, field: str, max_bad_fraction: float = 0.0, count: bool = False) -> Shards:
    """The readable shards of ``spec``. Each must exist and open as a non-empty tar (else an error names it);
    damaged ones are skipped and logged, or stop the run past ``max_bad_fraction``. With ``count``, every tar's
    headers are walked to count its usable samples (which also finds damage anywhere in a tar)."""
    paths = expand(spec, field=field)
    damaged: dict[str, str] = {}
    samples, other = 0, []
    for path in paths:
        _check_opens(path, field=field, spec=spec)
        if not count:
            if (why := damage(path)) is not None:
                damaged[path] = why
            continue
        try:
            found = walk_headers(path)
        except (tarfile.TarError, OSError) as e:
            damaged[path] = _walk_damage(path, e)
            continue
        samples += found.usable
        other += [(path, key) for key in found.other_format]
    _set_aside(damaged, total=len(paths), field=field, max_bad_fraction=max_bad_fraction)
    good = [p for p in paths if p not in damaged]
    _say_other_formats(field, other if count else _probe_formats(good[0]), probed=not count)
    return Shards(good, samples if count else None)


def index_paths(paths: list[str]) -> list[str] | None:
    """DALI index files ('shard.idx' beside 'shard.tar') when every shard has one, else None."""
    idx = [str(Path(p).with_suffix(".idx")) for p in paths]
    return idx if all(Path(p).is_file() for p in idx) else None
