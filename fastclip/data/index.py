"""Index files: DALI's per-shard index, the webdataset ``sizes.json`` summary, and the check of every sample
that decides what goes into them.

``python -m fastclip.data.shards index SHARDS...`` (fastclip/data/shards.py) runs :func:`index_shards`.
Each shard's samples are checked cheaply (the image's magic bytes and end marker, a caption present and UTF-8;
``deep`` decodes every image); the samples that pass are written to ``SHARD.idx`` in DALI's format (v1.2: a
line ``v1.2 N``, then per sample ``ext offset size name`` for each of its files, offsets of the data, not of
the tar header), so a loader reading with the index never meets the others. Where the index files live is a
*place*: beside the shards, or one folder (``--index-dir``) for shards on a read-only filesystem. The place
also holds ``sizes.json`` ({shard file name: samples}, the convention open_clip's ``get_dataset_size`` reads)
and ``fastclip_index.json`` (each shard's size in bytes when indexed, and the samples left out, with why).
Both are merged with what a place already holds, and every file is written atomically: an interrupted run
leaves the previous files whole.

Why one module: the check of a sample and the files it decides are one format; apart, what the index says and
what the loaders are told a sample is could drift.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import tarfile
import tempfile
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastclip.data.remote import display, download, is_remote
from fastclip.data.tar_layout import (
    IMAGE_EXTS,
    OTHER_IMAGE_EXTS,
    check_only_zeros_after,
    gzipped,
    member_groups,
    sample_key,
)

INDEX_VERSION = "v1.2"  # the version DALI's fn.readers.webdataset reads (its wds2idx writes the same)
SIZES = "sizes.json"
REPORT = "fastclip_index.json"
TAIL = 1024  # bytes read from an image's end: its end marker, allowing for a little trailing padding

JPEG, PNG, WEBP = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF"


def image_format(head: bytes) -> str | None:
    """'jpeg', 'png' or 'webp' from an image's first bytes (both loaders decode by content, not extension)."""
    if head.startswith(JPEG):
        return "jpeg"
    if head.startswith(PNG):
        return "png"
    if head.startswith(WEBP) and head[8:12] == b"WEBP":
        return "webp"
    return None


def image_damage(fmt: str, head: bytes, tail: bytes, size: int) -> str | None:
    """What is wrong with an image whose format is known, from its first and last bytes; None when it looks whole."""
    if fmt == "jpeg" and b"\xff\xd9" not in tail:
        return "a JPEG cut short (no end-of-image marker)"
    if fmt == "png" and b"IEND" not in tail[-16:]:
        return "a PNG cut short (no IEND chunk)"
    if fmt == "webp" and int.from_bytes(head[4:8], "little") + 8 > size:
        return f"a WebP cut short (its header says {int.from_bytes(head[4:8], 'little') + 8} bytes, it has {size})"
    return None


@dataclass
class ShardIndex:
    """What indexing one shard found."""

    path: str
    bytes: int = 0
    samples: list[list[tuple[str, int, int, str]]] = field(default_factory=list)  # per sample: its files
    count: int = 0  # samples indexed
    # what index_shards returns instead of the lists above, once written (to the index and the shard's report)
    left_out: int = 0
    reasons: Counter = field(default_factory=Counter)  # samples left out, by why
    notes_by_kind: Counter = field(default_factory=Counter)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (key, why), left out of the index
    notes: list[tuple[str, str]] = field(default_factory=list)  # (key, what), kept: e.g. a PNG named .jpg
    error: str | None = None  # the shard as a whole is unreadable: no index is written for it


class _Reader:
    """Reads parts of tar members by offset, from one open file."""

    def __init__(self, f):
        self.f = f

    def read(self, member: tarfile.TarInfo, start: int = 0, n: int | None = None) -> bytes:
        self.f.seek(member.offset_data + start)
        return self.f.read(member.size - start if n is None else n)

    def ends(self, member: tarfile.TarInfo) -> tuple[bytes, bytes]:
        head = self.read(member, 0, min(member.size, 16))
        tail = self.read(member, max(member.size - TAIL, 0))
        return head, tail


def check_sample(key: str, group: dict[str, tarfile.TarInfo], reader: _Reader, *, deep: bool) -> tuple[str | None, str]:
    """(why the sample is left out, or None; a note about a kept one, or '')."""
    images = [e for e in IMAGE_EXTS if e in group]
    if not images:
        other = sorted(set(group) & set(OTHER_IMAGE_EXTS))
        return (f"its image is {other[0]}, which fastclip does not decode" if other else "it has no image"), ""
    if "txt" not in group:
        return "it has no caption (KEY.txt)", ""
    caption = reader.read(group["txt"])
    try:
        text = caption.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"its caption is not UTF-8 (byte {caption[e.start]:#04x} at {e.start})", ""
    if not text.strip():
        return "its caption is empty", ""
    member = group[images[0]]
    if member.size == 0:
        return f"its image {key}.{images[0]} is an empty file", ""
    head, tail = reader.ends(member)
    fmt = image_format(head)
    if fmt is None:
        return f"its image {key}.{images[0]} is not a JPEG, PNG or WebP file (it starts with {head[:8].hex(' ')})", ""
    if why := image_damage(fmt, head, tail, member.size):
        # data after the end marker (a phone's motion photo, an appended thumbnail) hides it from the tail: decode
        if _decode_damage(reader.read(member)) is not None:
            return why, ""
        return None, f"{why.split(' (')[0].replace('cut short', 'with data after its end')}: it decodes, kept"
    if deep and (why := _decode_damage(reader.read(member))):
        return why, ""
    named = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}[images[0]]
    return None, (f"a {fmt.upper()} named .{images[0]}: decoded by its content" if fmt != named else "")


def _decode_damage(data: bytes) -> str | None:
    """The decoder's complaint about an image, or None when it decodes (the CPU decoder of the torch loader)."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:
        return f"its image does not decode ({str(e).strip().splitlines()[-1]})"
    return None if image.numel() else "its image decodes to no pixels"


def index_shard(path: str, *, deep: bool = False) -> ShardIndex:
    """Check every sample of one shard; the ones that pass, with their files' data offsets, for the index. The
    whole samples of a truncated shard are kept (the index reads them by offset); the one cut off is named."""
    found = ShardIndex(path)
    try:
        found.bytes = os.path.getsize(path)
        if found.bytes == 0:
            raise tarfile.ReadError("it is an empty (zero-byte) file")
        with tarfile.open(path, "r:") as tar, open(path, "rb") as f:
            for key, group in member_groups(tar):
                if any(m.offset_data + m.size > found.bytes for m in group.values()):
                    found.rejected.append((key, "the shard ends inside it (truncated)"))
                    continue
                if any(any(c.isspace() for c in m.name) for m in group.values()):
                    found.rejected.append((key, "its file names hold whitespace, which DALI's index cannot"))
                    continue
                why, note = check_sample(key, group, _Reader(f), deep=deep)
                if why:
                    found.rejected.append((key, why))
                    continue
                if note:
                    found.notes.append((key, note))
                found.samples.append([(ext, m.offset_data, m.size, m.name) for ext, m in group.items()])
            end = tar.offset
        check_only_zeros_after(path, end)
    except (tarfile.TarError, OSError) as e:  # LayoutError is a TarError
        read = len(found.samples) + len(found.rejected)
        if not read:
            found.error = (
                "gzip-compressed: gunzip it (fastclip reads plain tars)"
                if gzipped(path)
                else (f"not a readable tar ({e})")
            )
        else:  # the samples before the damage are whole, and indexed
            last = sample_key(found.samples[-1][-1][3])[0] if found.samples else found.rejected[-1][0]
            found.rejected.append((f"(after {last})", f"the shard ends inside it (truncated), or is damaged: {e}"))
    if found.error is None and not found.samples:
        found.error = "it holds no usable sample" if found.rejected else "it is an empty tar archive"
    found.count = len(found.samples)
    return found


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in s) for s in samples]
    return "\n".join(lines) + "\n"


def read_index(idx: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """An index file's samples: (key, {extension: (data offset, size)}). ValueError names what is wrong."""
    with open(idx, encoding="utf-8") as f:
        version, _, count = f.readline().partition(" ")
        samples = []
        for line in f:
            parts = line.split()
            if not parts or len(parts) % 4:
                raise ValueError(f"index file {idx}: line {len(samples) + 2} is not 'ext offset size name' groups")
            files = {parts[i].lower(): (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
            samples.append((sample_key(parts[3])[0], files))
    if version != INDEX_VERSION or not count.strip().isdigit() or int(count) != len(samples):
        raise ValueError(f"index file {idx} is not a whole {INDEX_VERSION} index; re-run the index tool")
    return samples


def indexed_count(idx: str) -> int:
    """The sample count an index file's first line states."""
    with open(idx, encoding="utf-8") as f:
        version, _, count = f.readline().strip().partition(" ")
    if version != INDEX_VERSION or not count.isdigit():
        raise ValueError(f"index file {idx} does not start with '{INDEX_VERSION} N'; re-run the index tool")
    return int(count)


_UMASK = os.umask(0o022)  # read the process's umask (the only way is to set it) and put it back at once
os.umask(_UMASK)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp's 0600 would keep a shared set's index from its other users
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def place_of(shard: str, index_dir: str | None) -> str:
    """The folder holding a shard's index file and summaries (strings: start-up calls this per shard): beside it,
    or in ``index_dir`` a subfolder per shard folder, so that sets whose shards share names (a train and a val set
    of img2dataset's '00000.tar') share one index folder without clashing."""
    folder = os.path.dirname(shard) or "."
    return _subfolder(index_dir, folder) if index_dir else folder


@functools.cache
def _subfolder(index_dir: str, folder: str) -> str:
    """``index_dir``'s subfolder for the shards of ``folder``: its name and a hash of its real path (the same
    whichever way the folder is spelled, from the index run to the training run)."""
    real = folder if is_remote(folder) else os.path.realpath(folder)
    return f"{index_dir}/{os.path.basename(real) or 'root'}-{hashlib.sha1(real.encode()).hexdigest()[:12]}"


def _stem(shard: str) -> str:
    name = shard.rpartition("/")[2]
    return name.rpartition(".")[0] or name


def index_path(shard: str, index_dir: str | None = None) -> str:
    return f"{place_of(shard, index_dir)}/{_stem(shard)}.idx"


def index_files(paths: list[str], index_dir: str | None) -> dict[str, str]:
    """The shards that have an index file, and its path: one folder listing per place, not a stat per shard."""
    listed: dict[str, set[str]] = {}
    found = {}
    for p in paths:
        place = place_of(p, index_dir)
        if (names := listed.get(place)) is None:
            try:
                names = listed[place] = {n for n in os.listdir(place) if n.endswith(".idx")}
            except OSError:
                names = listed[place] = set()
        if (name := _stem(p) + ".idx") in names:
            found[p] = f"{place}/{name}"
    return found


def read_json_object(path: Path) -> dict:
    """A JSON object file the index tool writes ({} when absent); ValueError naming it and the fix otherwise."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except PermissionError:
        raise ValueError(f"{path} cannot be read by this user: ask its owner to make it readable") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): re-run the index tool on its shards, or delete it") from None
    if not isinstance(found, dict):
        raise ValueError(f"{path} holds no JSON object: re-run the index tool on its shards, or delete it")
    return found


def report_path(shard: str, index_dir: str | None = None) -> str:
    """The file naming a shard's samples left out (and kept with a note): beside its index file."""
    return f"{place_of(shard, index_dir)}/{_stem(shard)}.report.json"


@contextlib.contextmanager
def _locked(place: Path):
    """One index run at a time merges into a place's summaries (others wait): parallel jobs over one folder's
    shards would otherwise lose each other's entries."""
    # opened read-only (flock needs no more), created readable and writable by all: another user re-indexing a
    # shared folder needs it as much as its first one
    fd = os.open(place / ".fastclip_index.lock", os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def update_summaries(found: Iterable[ShardIndex], index_dir: str | None) -> list[Path]:
    """Merge these shards' counts into their places' ``sizes.json`` and ``fastclip_index.json`` (which start-up
    reads, so it holds counts only: the samples left out are in each shard's report file)."""
    by_place: dict[str, list[ShardIndex]] = {}
    for f in found:
        by_place.setdefault(place_of(f.path, index_dir), []).append(f)
    written = []
    for place, shards in ((Path(place), shards) for place, shards in by_place.items()):
        with _locked(place):
            sizes, report = read_json_object(place / SIZES), read_json_object(place / REPORT)
            entries = report.setdefault("shards", {})
            for f in shards:
                name = Path(f.path).name
                entries[name] = {"bytes": f.bytes, "samples": f.count, "error": f.error, "left_out": f.left_out}
                if f.error is None:
                    sizes[name] = f.count
                else:
                    sizes.pop(name, None)  # no index, no count: a run sets it aside
            report["version"] = INDEX_VERSION
            write_atomically(place / SIZES, json.dumps(dict(sorted(sizes.items())), indent=0) + "\n")
            write_atomically(place / REPORT, json.dumps(report, indent=1, sort_keys=True) + "\n")
        written += [place / SIZES, place / REPORT]
    return written


def _index_remote(url: str, index_dir: str, deep: bool) -> ShardIndex:
    """A remote shard, downloaded next to its index files (a file the local checks can seek in) and indexed."""
    with tempfile.NamedTemporaryFile(dir=place_of(url, index_dir), suffix=".tar.part") as tmp:
        try:
            download(url, tmp)
            tmp.flush()
        except OSError as e:
            return ShardIndex(url, error=f"unreadable: {e}")
        found = index_shard(tmp.name, deep=deep)
    found.path = url
    if found.error and "not a readable tar" in found.error:
        found.error = found.error.replace(tmp.name, display(url))
    return found


def _index_one(path: str, index_dir: str | None, deep: bool) -> ShardIndex:
    found = _index_remote(path, index_dir, deep) if is_remote(path) else index_shard(path, deep=deep)
    idx, report = Path(index_path(path, index_dir)), Path(report_path(path, index_dir))
    if found.error is None:
        write_atomically(idx, index_text(found.samples))
    else:
        idx.unlink(missing_ok=True)  # an old index of a shard that is now unreadable would point into garbage
    if found.rejected or found.notes:
        text = {"shard": display(path), "rejected": found.rejected, "notes": found.notes}
        write_atomically(report, json.dumps(text, indent=1) + "\n")
    else:
        report.unlink(missing_ok=True)
    # only counts travel back: 41,000 shards' offsets and rejected keys would not fit in the parent's memory
    found.left_out, found.reasons = len(found.rejected), Counter(why.split(" (")[0] for _, why in found.rejected)
    found.notes_by_kind = Counter(note.split(":")[0] for _, note in found.notes)
    found.samples, found.rejected, found.notes = [], [], []
    return found


def index_shards(paths: list[str], *, index_dir: str | None = None, workers: int = 1, deep: bool = False,
                 progress=None) -> list[ShardIndex]:  # fmt: skip
    """Index ``paths`` (``workers`` processes), then update their places' summaries. ``progress(n)`` is called
    as shards finish. Returns what each shard held (offsets dropped)."""
    remote = [p for p in paths if is_remote(p)]
    if remote and not index_dir:
        raise ValueError(f"{display(remote[0])} is a remote shard: its index files need a folder here, --index-dir "
                         "DIR (then --data.index_dir DIR when training)")  # fmt: skip
    for path in paths:  # a shard that is not there is a mistake in the list, not a damaged shard
        if is_remote(path):
            continue  # a request each: one that fails is named in the report
        if os.path.isdir(path):
            raise ValueError(f"{path} is a folder: name its shards, e.g. '{path}/*.tar'")
        if not os.path.isfile(path):
            raise ValueError(f"shard {path} does not exist")
    for place in sorted({place_of(p, index_dir) for p in paths}):
        try:
            os.makedirs(place, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot make the index folder {place} ({e.strerror}): give another --index-dir") from None
        if not os.access(place, os.W_OK):
            raise ValueError(f"cannot write the index files into {place}: pass --index-dir DIR (and then "
                             "--data.index_dir DIR when training)")  # fmt: skip
    found = []
    if workers <= 1:
        for p in paths:
            found.append(_index_one(p, index_dir, deep))
            progress and progress(1)
    else:
        with ProcessPoolExecutor(workers) as pool:
            for f in pool.map(_index_one, paths, [index_dir] * len(paths), [deep] * len(paths), chunksize=8):
                found.append(f)
                progress and progress(1)
    update_summaries(found, index_dir)
    return found


@dataclass
class Known:
    """What the index tool recorded about a list of shards, read without opening a tar."""

    samples: dict[str, int]  # usable samples, per shard counted
    bad: dict[str, str]  # shards the index tool found unusable: why
    bytes: dict[str, int]  # each shard's size when it was indexed, where recorded
    missing: list[str]  # shards neither counted nor found unusable
    indexed: dict[str, str]  # the shards with an index file, and its path


def known_counts(paths: list[str], index_dir: str | None) -> Known:
    """The shards' sample counts as this tool recorded them (``sizes.json`` for the shards ``fastclip_index.json``
    lists and whose index file is there), and the shards it found unusable. A ``sizes.json`` written by hand or by
    another tool, and index files another tool wrote (DALI's wds2idx lists every sample, usable or not), do not
    count: a wrong count would shift which samples each rank reads. ValueError names a summary that is not one."""
    sizes, reports = {}, {}
    for place in {place_of(p, index_dir) for p in paths}:
        sizes[place] = read_json_object(Path(place) / SIZES)
        reports[place] = read_json_object(Path(place) / REPORT).get("shards", {})
    indexed = index_files(paths, index_dir)
    known = Known({}, {}, {}, [], indexed)
    for p in paths:
        place, name = place_of(p, index_dir), p.rpartition("/")[2]
        entry = reports[place].get(name)
        if not isinstance(entry, dict):
            known.missing.append(p)
            continue
        if isinstance(entry.get("bytes"), int):
            known.bytes[p] = entry["bytes"]
        if entry.get("error"):
            known.bad[p] = f"the index tool found it unusable: {entry['error']}"
        elif p not in indexed:
            known.missing.append(p)  # its index file is gone (or was never copied along): not to be trusted
        elif isinstance(n := sizes[place].get(name), int) and n >= 0:
            known.samples[p] = n
        else:
            known.samples[p] = indexed_count(indexed[p])
    return known
