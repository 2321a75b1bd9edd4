"""How a webdataset shard is laid out, read from its tar headers alone: which members make a sample, which
images fastclip decodes, and what a damaged tar looks like (a truncated end, a header that does not parse). The
lowest module of the data path: the shard resolution (shard_specs.py), the index tool, convert and both loaders read
tars through it."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from fastclip.data.remote import is_remote, open_shard
from fastclip.data.skips import log

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # what both loaders decode; img2dataset's encode_format choices
# images in other formats: their samples are left out, counted and named (a format the user can re-encode)
OTHER_IMAGE_EXTS = ("gif", "bmp", "tif", "tiff", "avif", "heic", "jxl", "jp2")
BLOCK = 512  # tar's block; an archive ends with two zero blocks


def sample_key(name: str) -> tuple[str, str]:
    """webdataset's rule for a tar member: (key, extension). The key is the folder and the file name up to its
    first dot ('./a.b/000.jpg' -> './a.b/000'), the extension the rest, lower-cased ('jpg', 'seg.png')."""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext.lower()


class LayoutError(tarfile.TarError):
    """A tar whose members are not grouped by sample, as webdataset requires."""


def member_groups(members) -> Iterator[tuple[str, dict[str, tarfile.TarInfo]]]:
    """(key, {extension: member}) for each run of consecutive files with one key, as webdataset groups samples.
    A key met again after another one means the tar was not written sample by sample (``tar cf x.tar *.jpg
    *.txt``): readers that pair consecutive files would find no sample in it, so it is an error here."""
    seen: set[str] = set()
    key, group = None, {}
    for member in members:
        if not member.isfile():
            continue
        k, ext = sample_key(member.name)
        if k != key:
            if group:
                yield key, group
            if k in seen:
                raise LayoutError(
                    f"the files of sample {k!r} are not next to each other ({member.name} comes after other samples'); "
                    "webdataset shards hold each sample's files in a row: re-create it with webdataset or img2dataset"
                )
            seen.add(k)
            key, group = k, {}
        group[ext] = member
    if group:
        yield key, group


_bad_labels_said = False


def parse_label(raw: bytes, *, where: str) -> int:
    """A sample's ``KEY.cls`` as a class index, -1 when it has none. One that is not an integer is read as none,
    and said once (naming the first): a label is for zero-shot scoring only, not worth a stopped run."""
    global _bad_labels_said
    text = raw.strip()
    if not text:
        return -1
    try:
        return int(text)
    except ValueError:
        if not _bad_labels_said:
            _bad_labels_said = True
            log.warning("%s: its KEY.cls %r is not an integer class index; such samples count as unlabelled", where,
                        text[:32].decode("utf-8", "replace"))  # fmt: skip
        return -1


def usable(exts) -> bool:
    """An image fastclip decodes and a caption, as open_clip's filter_no_caption_or_no_image asks."""
    return "txt" in exts and any(e in exts for e in IMAGE_EXTS)


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


def check_only_zeros_after(path: str, offset: int, f=None) -> None:
    """tarfile ends a walk quietly at a header that does not parse, as if the archive ended there: only zeros
    (the end blocks and their padding) may follow, or the rest of the shard would be lost without a word. ``f``:
    the shard already open (a remote one)."""
    with contextlib.nullcontext(f) if f else open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 16):
            if any(chunk):
                raise tarfile.ReadError(f"the tar header at byte {offset} does not parse; more bytes follow")


def walk_headers(path: str) -> ShardCount:
    """Count a shard's samples from its tar headers; raises tarfile.TarError/OSError where the tar is damaged."""
    count = ShardCount()
    with open_shard(path) as f:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for key, group in member_groups(tar):
                if usable(group):
                    count.usable += 1
                elif "txt" in group and (other := sorted(set(group) & set(OTHER_IMAGE_EXTS))):
                    count.other_format.append(f"{key}.{other[0]}")
            end = tar.offset  # where tarfile stopped: the end-of-archive blocks, or a header it could not parse
        check_only_zeros_after(path, end, f)
    return count


@functools.cache
def _walk_cached(path: str, size: int, mtime_ns: int) -> ShardCount:
    return walk_headers(path)


def walk(path: str) -> ShardCount:
    """:func:`walk_headers`, once per file version in a process: the start-up check and the loader share it (a
    remote shard once per process: asking whether it changed would cost a request)."""
    if is_remote(path):
        return _walk_cached(path, 0, 0)
    stat = os.stat(path)
    return _walk_cached(path, stat.st_size, stat.st_mtime_ns)


def damage(path: str) -> str | None:
    """What is wrong with a shard that exists and opens as a tar, or None. The cheap end check first; a shard that
    fails it is walked header by header, so that a tar written without end blocks but whole still counts."""
    suspect = _tail_damage(path)
    if suspect is None:
        return None
    try:
        walk(path)
    except (tarfile.TarError, OSError) as e:
        return _walk_damage(path, e)
    return None


def _walk_damage(path: str, error: Exception) -> str:
    tail = None if is_remote(path) else _tail_damage(path)
    return f"{tail}: truncated or damaged ({error})" if tail else f"damaged: {error}"


def gzipped(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False
