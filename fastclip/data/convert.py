"""Webdataset shards from what open_clip users have: its ``--dataset-type csv`` file, or a folder of images.

``python -m fastclip.data.shards convert --csv FILE --out DIR`` (or ``--folder DIR --out DIR``) writes
``DIR/shard-000000.tar``, ... of up to ``--shard-size`` samples, each sample ``KEY.jpg`` (or ``.png``/``.webp``:
the image's bytes as they are, named by their content), ``KEY.txt`` (the caption, UTF-8) and ``KEY.json``
({"key", "source", "caption"}, plus "row" for a CSV), in input order; KEY is a running number, zero-padded so
that keys sort and are unique across the shards. Then the shards are indexed (DALI's ``.idx`` beside each,
``sizes.json``), unless ``--no-index``.

A row that cannot become a sample is skipped, counted and listed in ``DIR/PREFIX.convert_report.json`` (one per
``--prefix``: sets converted into one folder keep their own; in it, its row number, the first row after the header
being 1, or its path in the folder; the reason; the detail), never fatal: an image missing, unreadable, not an
image, cut short (the cheap checks the index tool makes, so what is written is what gets indexed), or in a format
the loaders do not decode (GIF, BMP, TIFF: re-encoded to PNG with ``--reencode``); a caption empty or missing; a
folder image without its ``.txt``. Only when no row at all makes a sample is it an error.

The CSV is read as open_clip's CsvDataset reads it (pandas ``read_csv`` with ``sep``, image paths relative to
the current directory unless ``--root``), except that every field is read as text, exactly as written: open_clip's
pandas defaults would turn a caption 'NA' into 'nan' and '007' into '7'. In folder mode a caption file that is
not valid UTF-8 is decoded with its undecodable bytes replaced by U+FFFD and kept (losing an image for a few
characters costs more than the characters); each such file is listed in the report, so that a folder written in
another encoding shows. Captions are stripped of surrounding whitespace in both modes.
"""

from __future__ import annotations

import argparse
import difflib
import glob
import io
import json
import os
import sys
import tarfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from fastclip.data.index import TAIL, ShardIndex, image_damage, image_format, index_shards
from fastclip.data.tar_layout import IMAGE_EXTS, OTHER_IMAGE_EXTS
from fastclip.errors import ConfigError

REPORT = "convert_report.json"  # DIR/PREFIX.convert_report.json: report_path
KEY_DIGITS = 9  # keys sort as text while they stay under a billion samples
SHARD_DIGITS = 6
DEFAULT_WORKERS = 8  # threads reading image files: I/O, so more than the cores
SEPARATORS = ("\t", ",", ";", "|")  # what a header that parsed as one column is checked for
_READ_AHEAD = 4  # rows in flight per worker: enough to hide latency, bounded so that memory is

# reasons a row is skipped; the summary counts by these, the report adds each row's detail
NO_IMAGE_PATH = "no image path"
IMAGE_NOT_FOUND = "image not found"
IMAGE_UNREADABLE = "image unreadable"
NOT_AN_IMAGE = "not an image"
DAMAGED_IMAGE = "damaged image"
OTHER_FORMAT = "image format not decoded by fastclip"
REENCODE_FAILED = "re-encoding failed"
EMPTY_CAPTION = "empty caption"
NO_CAPTION_FILE = "no caption file"
CAPTION_UNREADABLE = "caption file unreadable"

_FOLDER_IMAGE_EXTS = {f".{e}" for e in IMAGE_EXTS + OTHER_IMAGE_EXTS}  # others are listed, or re-encoded


@dataclass
class _Row:
    """One input row: what it names, before any file is read."""

    where: dict  # how the report names it: {"row": n, "image": path} or {"path": relative path}
    source: str  # the image as the input names it (the sample's json "source")
    image: Path | None  # the file to read; None when the row names none
    caption: str | None = None  # CSV: the caption cell
    caption_file: Path | None = None  # folder: the .txt beside the image


@dataclass
class _Skip:
    reason: str
    detail: str = ""


@dataclass
class _Sample:
    ext: str  # 'jpg', 'png' or 'webp'
    image: bytes
    caption: str
    original_format: str | None = None  # set when re-encoded: 'gif', 'bmp', ...
    caption_replaced: bool = False  # folder: the caption file was not valid UTF-8


@dataclass
class ConvertResult:
    """What a conversion wrote and left out."""

    out_dir: Path
    shards: list[Path]
    samples: list[int]  # per shard
    rows: int  # rows (CSV) or images (folder) read
    unit: str  # what a row is: 'rows' or 'images'
    skipped: list[dict]  # per skipped row: its "row"/"image" or "path", "reason", "detail"
    replaced: list[str] = field(default_factory=list)  # folder: caption files that were not valid UTF-8
    reencoded: int = 0
    report: Path | None = None
    indexed: list[ShardIndex] | None = None  # what index_shards found per shard; None when not indexed

    @property
    def written(self) -> int:
        return sum(self.samples)

    def skipped_by_reason(self) -> Counter:
        return Counter(s["reason"] for s in self.skipped)

    def summary(self) -> str:
        lines = [f"wrote {_count(self.written, 'sample')} in {_count(len(self.shards), 'shard')} to {self.out_dir}"]
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped_by_reason().most_common())
            lines.append(f"skipped {len(self.skipped)} of {self.rows} {self.unit}: {reasons} (each listed in "
                         f"{self.report})")  # fmt: skip
        if self.reencoded:
            lines.append(f"re-encoded {_count(self.reencoded, 'image')} to PNG")
        if self.replaced:
            lines.append(
                f"{_count(len(self.replaced), 'caption file')} not valid UTF-8 (e.g. {self.replaced[0]}): their "
                f"undecodable bytes became U+FFFD (listed in {self.report}); re-save them as UTF-8 to keep them"
            )
        if self.indexed is not None:
            left_out = sum(f.left_out for f in self.indexed)
            lines.append(f"indexed: a .idx beside each shard, the counts in {self.out_dir / 'sizes.json'}"
                         + (f"; the index left out {_count(left_out, 'sample')} (see the shards' .report.json)"
                            if left_out else ""))  # fmt: skip
        return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ---------------------------------------------------------------------------------------------------------- CSV


def _read_header(csv_path: Path, separator: str) -> list[str]:
    import pandas as pd

    try:
        return [str(c) for c in pd.read_csv(csv_path, sep=separator, nrows=0).columns]
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{csv_path}: the file is empty; it needs a header row naming its columns") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise _unreadable(csv_path, separator, e) from None


def _unreadable(csv_path: Path, separator: str, e: Exception) -> ConfigError:
    if isinstance(e, UnicodeDecodeError):  # open_clip's read fails alike: pandas reads UTF-8 unless told
        return ConfigError(
            f"{csv_path}: is not UTF-8 text ({e.reason} in its first {e.end} bytes); re-save it as UTF-8"
        )
    return ConfigError(
        f"{csv_path}: does not parse as a table separated by {separator!r}: {str(e).strip()}. A field that holds the "
        'separator needs quotes ("..."); check --csv-separator'
    )


def _check_columns(csv_path: Path, columns: list[str], *, separator: str, image_key: str, caption_key: str) -> None:
    """A header without the named columns is an error that says which option to set, or that the separator is
    wrong: a header that parsed as one column holding another separator is a file split on the wrong one."""
    missing = [(key, option) for key, option in ((image_key, "--csv-img-key"), (caption_key, "--csv-caption-key"))
               if key not in columns]  # fmt: skip
    if not missing:
        return
    named = " and ".join(f"{key!r}" for key, _ in missing)
    head = f"{csv_path}: has no column {named}; its header has {len(columns)} column(s): {columns}."
    if len(columns) == 1:
        found = [s for s in SEPARATORS if s != separator and s in columns[0]]
        if found:
            raise ConfigError(
                f"{head} The separator is probably wrong: the file was split on {separator!r}, and its one column "
                f"holds {found[0]!r}. Pass --csv-separator {found[0]!r}"
                + (" (in a shell: --csv-separator $'\\t')" if found[0] == "\t" else "")
            )
    fixes = []
    for key, option in missing:
        close = difflib.get_close_matches(key, columns, n=1, cutoff=0.5)
        fixes.append(f"{option} NAME" + (f" (perhaps {option} {close[0]!r})" if close else ""))
    raise ConfigError(f"{head} Pass {' and '.join(fixes)} to name the column to use.")


class _CsvRows(Sequence):
    """The CSV's rows, each made a :class:`_Row` when it is read: two lists of strings are what a CSV of millions
    of rows can afford to hold (open_clip holds the same), not an object per row."""

    def __init__(self, images: list, captions: list, root: Path | None):
        self.images, self.captions, self.root = images, captions, root

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> _Row:
        image, caption = self.images[i], self.captions[i]
        image = image if isinstance(image, str) else ""  # a short row's missing fields come back as NaN
        caption = caption if isinstance(caption, str) else ""
        path = None if not image.strip() else (self.root / image if self.root is not None else Path(image))
        return _Row({"row": i + 1, "image": image}, image, path, caption=caption)


def _csv_rows(csv_path: Path, *, separator: str, image_key: str, caption_key: str, root: Path | None) -> _CsvRows:
    import pandas as pd

    # every field as text: pandas' guesses would turn a caption 'NA' into NaN and an image '007' into 7. All
    # columns, as open_clip reads them: with usecols pandas cuts a row with too many fields short without a word
    try:
        df = pd.read_csv(csv_path, sep=separator, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise _unreadable(csv_path, separator, e) from None
    return _CsvRows(df[image_key].tolist(), df[caption_key].tolist(), root)


def _check_root(csv_path: Path, rows: _CsvRows, root: Path | None, probe: int = 100) -> None:
    """Relative image paths are read from the current directory (as open_clip does): when none of the first rows'
    images is there but some are beside the CSV, the paths were written relative to it, and --root says so."""
    first = (rows[i] for i in range(min(probe, len(rows))))
    relative = [r for r in first if r.image is not None and not Path(r.source).is_absolute()]
    if not relative or any(r.image.exists() for r in relative):
        return
    base = csv_path.parent
    if base.resolve() != (root or Path.cwd()).resolve() and any((base / r.source).exists() for r in relative):
        where = f"--root {root}" if root is not None else f"the current directory ({Path.cwd()})"
        raise ConfigError(
            f"{csv_path}: none of the first {len(relative)} image paths exist under {where} (e.g. row "
            f"{relative[0].where['row']}: {relative[0].source!r}), but they do beside the CSV: pass --root {base}"
        )


# ------------------------------------------------------------------------------------------------------- folder


def _walk_sorted(folder: Path) -> Iterator[tuple[Path, list[str]]]:
    """(directory, its file names) under ``folder``, symlinked folders followed once; hidden names (``.git``,
    macOS' ``._cat.jpg`` resource forks) left out."""
    seen = set()
    for here, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(here)
        if real in seen:  # a symlink loop, or a folder reached twice
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        yield Path(here), [f for f in files if not f.startswith(".")]


def _folder_rows(folder: Path) -> list[_Row]:
    found = []
    for here, files in _walk_sorted(folder):
        captions = {Path(f).stem: here / f for f in files if Path(f).suffix.lower() == ".txt"}
        for f in files:
            if Path(f).suffix.lower() in _FOLDER_IMAGE_EXTS and (here / f).is_file():
                rel = (here / f).relative_to(folder)
                found.append((rel.parts, rel, captions.get(Path(f).stem)))
    found.sort(key=lambda t: t[0])  # by path components: a folder's files together, the same order on any machine
    return [_Row({"path": rel.as_posix()}, rel.as_posix(), folder / rel, caption_file=txt) for _, rel, txt in found]


# ------------------------------------------------------------------------------------------------ reading a row


def _image_format(data: bytes) -> str | None:
    """The tar extension for bytes fastclip's loaders decode ('jpg', 'png', 'webp'), by content: both decode by
    content, and DALI picks a sample's image by extension, so the name must not lie."""
    return {"jpeg": "jpg", "png": "png", "webp": "webp", None: None}[image_format(data[:16])]


def _damage(ext: str, data: bytes) -> str | None:
    """The index tool's cheap checks, so that what is written is what gets indexed."""
    return image_damage({"jpg": "jpeg"}.get(ext, ext), data[:16], data[-TAIL:], len(data))


def _to_png(image) -> bytes:
    image.seek(0)  # an animated GIF: its first frame
    if image.mode not in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"):  # CMYK, YCbCr, F: PNG has no such mode
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _read_image(path: Path, *, reencode: bool) -> tuple[str, bytes, str | None] | _Skip:
    """(extension, bytes, the format it was re-encoded from or None), or why the row is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _Skip(IMAGE_NOT_FOUND, str(path))
    except OSError as e:  # a folder, no permission, an I/O error
        return _Skip(IMAGE_UNREADABLE, f"{path}: {e.strerror or e}")
    if not data:
        return _Skip(NOT_AN_IMAGE, f"{path} is an empty file")
    ext = _image_format(data)
    if ext is not None:
        why = _damage(ext, data)
        return _Skip(DAMAGED_IMAGE, f"{path}: {why}") if why else (ext, data, None)
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format or "unknown"
    except Exception:  # Pillow raises UnidentifiedImageError, and others for a header it half reads
        return _Skip(NOT_AN_IMAGE, f"{path} is not a JPEG, PNG or WebP, nor an image Pillow reads (it starts with "
                     f"{data[:8].hex(' ')})")  # fmt: skip
    if not reencode:
        return _Skip(OTHER_FORMAT, f"{path} is a {fmt} image; fastclip decodes JPEG, PNG and WebP: pass --reencode "
                     "to convert it to PNG")  # fmt: skip
    try:
        return "png", _to_png(image), fmt.lower()
    except Exception as e:  # a damaged GIF/TIFF fails here, at decode
        return _Skip(REENCODE_FAILED, f"{path}: {fmt} to PNG: {e}")


def _read_caption(row: _Row) -> tuple[str, bool] | _Skip:
    """(caption, whether undecodable bytes were replaced), or why the row is skipped."""
    if row.caption_file is None and row.caption is None:
        return _Skip(NO_CAPTION_FILE, f"no {Path(row.source).stem}.txt beside {row.source}")
    replaced = False
    if row.caption_file is not None:
        try:
            raw = row.caption_file.read_bytes()
        except OSError as e:
            return _Skip(CAPTION_UNREADABLE, f"{row.caption_file}: {e.strerror or e}")
        try:
            text = raw.decode("utf-8-sig")  # a BOM, as Windows' Notepad writes, is not part of the caption
        except UnicodeDecodeError:
            text, replaced = raw.decode("utf-8-sig", errors="replace"), True
    else:
        text = row.caption
    text = text.strip()
    if not text:
        where = row.caption_file if row.caption_file is not None else f"column for row {row.where.get('row')}"
        return _Skip(EMPTY_CAPTION, f"the caption ({where}) is empty")
    return text, replaced


def _load(row: _Row, *, reencode: bool) -> _Sample | _Skip:
    """A row's sample, or why it has none: the caption first (no image read for a row that is skipped anyway)."""
    caption = _read_caption(row)
    if isinstance(caption, _Skip):
        return caption
    if row.image is None:
        return _Skip(NO_IMAGE_PATH, f"the image cell of row {row.where.get('row')} is empty")
    image = _read_image(row.image, reencode=reencode)
    if isinstance(image, _Skip):
        return image
    ext, data, original = image
    return _Sample(ext, data, caption[0], original_format=original, caption_replaced=caption[1])


def _in_order(load: Callable[[_Row], object], rows: Iterable[_Row], workers: int) -> Iterator[tuple[_Row, object]]:
    """(row, load(row)) in input order, ``workers`` threads loading ahead: the output does not depend on which
    read finishes first, and at most ``workers * _READ_AHEAD`` rows' bytes are held."""
    if workers <= 1:
        for row in rows:
            yield row, load(row)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="convert-read") as pool:
        window: deque[tuple[_Row, Future]] = deque()
        try:
            for row in rows:
                window.append((row, pool.submit(load, row)))
                if len(window) >= workers * _READ_AHEAD:
                    done, future = window.popleft()
                    yield done, future.result()
            while window:
                done, future = window.popleft()
                yield done, future.result()
        finally:  # the writer stopped (an error, Ctrl-C): do not read the rest of the window
            for _, future in window:
                future.cancel()


# ----------------------------------------------------------------------------------------------------- writing


def _existing(out_dir: Path, prefix: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(str(out_dir)), glob.escape(prefix) + "-*.tar")))


def _check_out_dir(out_dir: Path, prefix: str, *, overwrite: bool, index: bool) -> list[Path]:
    """The shards an earlier conversion left that this one replaces (checked before anything is written)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: is a file, not a folder")
    old = _existing(out_dir, prefix)
    if old and not overwrite:
        raise ConfigError(
            f"--out {out_dir}: already holds {len(old)} shard(s) named {prefix}-*.tar (e.g. {old[0].name}). Pass "
            "--overwrite to replace them, or choose another --out or --prefix"
        )
    if old and not index:
        counted = [p.name for p in old if p.name in _read_json(out_dir / "sizes.json")]
        if counted:
            raise ConfigError(
                f"--out {out_dir}: its sizes.json counts the shards being replaced (e.g. {counted[0]}); with "
                "--no-index it would give the new shards the old counts. Drop --no-index (the new shards are "
                "indexed and their counts replaced)"
            )
    return old


def _read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # the same input gives the same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


class _ShardWriter:
    """Writes shards of ``shard_size`` samples, each under a temporary name renamed when complete: a conversion
    killed at any point leaves only whole ``{prefix}-NNNNNN.tar`` files. The shards it replaces (``old``) are
    removed when the first new one is complete, so that a conversion that writes nothing keeps them."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int, old: list[Path]):
        self.out_dir, self.prefix, self.shard_size, self.old = out_dir, prefix, shard_size, old
        self.shards: list[Path] = []
        self.samples: list[int] = []
        self._file = self._tar = self._tmp = None
        self._count = 0
        self._start = 0.0

    def _path(self, n: int) -> Path:
        return self.out_dir / f"{self.prefix}-{n:0{SHARD_DIGITS}d}.tar"

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._tmp = self._path(len(self.shards)).with_suffix(".tar.tmp")
            self._file = open(self._tmp, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self._count, self._start = 0, time.perf_counter()
        for ext, payload in members:  # one sample's files in a row, as webdataset groups them
            _add(self._tar, f"{key}.{ext}", payload)
        self._count += 1
        if self._count == self.shard_size:
            self.finish()

    def finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the data on disk before the name says the shard is whole
        self._file.close()
        if not self.shards:
            self._remove_old()
        path = self._path(len(self.shards))
        os.replace(self._tmp, path)
        self.shards.append(path)
        self.samples.append(self._count)
        print(f"{path}: {_count(self._count, 'sample')} ({time.perf_counter() - self._start:.1f}s)", flush=True)
        self._tar = self._file = self._tmp = None

    def abort(self) -> None:
        """Remove the shard being written (an error or Ctrl-C): its temporary file is this run's own."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None

    def _remove_old(self) -> None:
        """The shards --overwrite replaces, with what belongs to them alone: DALI's index beside each (it would
        point into the new shard of the same name) and a temporary file a killed conversion left."""
        for tar in self.old:
            tar.unlink(missing_ok=True)
            tar.with_suffix(".idx").unlink(missing_ok=True)
        pattern = glob.escape(str(self.out_dir / self.prefix)) + "-*.tar.tmp"
        for tmp in glob.glob(pattern):
            if Path(tmp) != self._tmp:
                Path(tmp).unlink(missing_ok=True)


def _check_options(*, shard_size: int, prefix: str, workers: int) -> None:
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ConfigError(f"--prefix must be a file name without '/', got {prefix!r}")


def _write(
    rows: Sequence[_Row], out_dir: Path, *, source: dict, shard_size: int, prefix: str, overwrite: bool, reencode: bool,
    workers: int, index: bool,
) -> ConvertResult:  # fmt: skip
    old = _check_out_dir(out_dir, prefix, overwrite=overwrite, index=index)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, prefix, shard_size, old)
    skipped, replaced, reencoded, key = [], [], 0, 0
    try:
        for row, got in _in_order(lambda r: _load(r, reencode=reencode), rows, workers):
            if isinstance(got, _Skip):
                skipped.append({**row.where, "reason": got.reason, "detail": got.detail})
                continue
            name = f"{key:0{KEY_DIGITS}d}"
            meta = {"key": name, "source": row.source, **({"row": row.where["row"]} if "row" in row.where else {}),
                    "caption": got.caption}  # fmt: skip
            if got.original_format:
                meta["original_format"] = got.original_format
                reencoded += 1
            if got.caption_replaced:
                replaced.append(row.source)
            writer.add(name, [(got.ext, got.image), ("txt", got.caption.encode("utf-8")),
                              ("json", json.dumps(meta, ensure_ascii=False).encode("utf-8"))])  # fmt: skip
            key += 1
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    unit = "rows" if "csv" in source else "images"
    result = ConvertResult(out_dir, writer.shards, writer.samples, len(rows), unit, skipped, replaced, reencoded,
                           report_path(out_dir, prefix))  # fmt: skip
    _write_report(result, source)
    if not result.written:
        reasons = ", ".join(f"{n} {reason}" for reason, n in result.skipped_by_reason().most_common())
        first = skipped[0]
        raise ConfigError(
            f"{source.get('csv') or source.get('folder')}: none of its {len(rows)} {unit} makes a sample ({reasons}); "
            f"the first: {first['detail'] or first['reason']}. Every row is listed in {result.report}; nothing was "
            "written"
        )
    if index:
        result.indexed = _index(result.shards, workers=workers)
    return result


def report_path(out_dir: Path, prefix: str) -> Path:
    """The report of the set written with ``prefix``: named by it, as another prefix's set in the same folder has
    its own (one file for all was overwritten by the last conversion)."""
    return out_dir / f"{prefix}.{REPORT}"


def _write_report(result: ConvertResult, source: dict) -> None:
    report = {
        **source,
        "written": result.written,
        "shards": {p.name: n for p, n in zip(result.shards, result.samples)},
        "skipped_by_reason": dict(result.skipped_by_reason().most_common()),
        "skipped": result.skipped,
        "captions_not_utf8": result.replaced,
        "reencoded": result.reencoded,
    }
    tmp = result.report.with_name(result.report.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, result.report)


def _index(shards: list[Path], *, workers: int) -> list[ShardIndex]:
    try:  # processes, unlike the reading threads: indexing parses tars, which holds the GIL
        return index_shards([str(p) for p in shards], workers=min(workers, os.cpu_count() or 1))
    except BaseException:
        again = f"python -m fastclip.data.shards index {shards[0].parent}/*.tar"
        print(f"the {len(shards)} shards are complete; indexing them failed (below): index them again with `{again}`",
              file=sys.stderr, flush=True)  # fmt: skip
        raise


# ---------------------------------------------------------------------------------------------------------- API


def convert_csv(
    csv_path: str | os.PathLike, out_dir: str | os.PathLike, *, separator: str = "\t", image_key: str = "filepath",
    caption_key: str = "title", shard_size: int = 10000, prefix: str = "shard", root: str | os.PathLike | None = None,
    overwrite: bool = False, reencode: bool = False, workers: int = DEFAULT_WORKERS, index: bool = True,
) -> ConvertResult:  # fmt: skip
    """Shards from an open_clip CSV (``--csv-separator``, ``--csv-img-key``, ``--csv-caption-key`` as open_clip
    reads them). ``root``: the folder relative image paths are read from (default: the current directory, as
    open_clip does). Raises ConfigError, before writing, for a header without the columns, an output folder that
    already holds shards (without ``overwrite``), or a file that does not parse; after reading, when no row makes
    a sample."""
    csv_path, out_dir = Path(csv_path), Path(out_dir)
    root = Path(root) if root is not None else None
    _check_options(shard_size=shard_size, prefix=prefix, workers=workers)
    if not csv_path.is_file():
        raise ConfigError(f"--csv {csv_path}: no such file")
    if root is not None and not root.is_dir():
        raise ConfigError(f"--root {root}: no such folder")
    _check_columns(csv_path, _read_header(csv_path, separator), separator=separator, image_key=image_key,
                   caption_key=caption_key)  # fmt: skip
    _check_out_dir(out_dir, prefix, overwrite=overwrite, index=index)  # before reading a large file, too
    rows = _csv_rows(csv_path, separator=separator, image_key=image_key, caption_key=caption_key, root=root)
    if not rows:
        raise ConfigError(f"--csv {csv_path}: has a header but no rows")
    _check_root(csv_path, rows, root)
    source = {"csv": str(csv_path), "separator": separator, "image_key": image_key, "caption_key": caption_key,
              "root": str(root) if root is not None else None}  # fmt: skip
    return _write(rows, out_dir, source=source, shard_size=shard_size, prefix=prefix, overwrite=overwrite,
                  reencode=reencode, workers=workers, index=index)  # fmt: skip


def convert_folder(
    folder: str | os.PathLike, out_dir: str | os.PathLike, *, shard_size: int = 10000, prefix: str = "shard",
    overwrite: bool = False, reencode: bool = False, workers: int = DEFAULT_WORKERS, index: bool = True,
) -> ConvertResult:  # fmt: skip
    """Shards from a folder of images with captions beside them (``cat.jpg`` + ``cat.txt``), searched
    recursively, in sorted path order. Images: jpg, jpeg, png, webp in any case (gif, bmp, tif(f), ... are
    listed as skipped, or re-encoded to PNG with ``reencode``); hidden files and folders are left out."""
    folder, out_dir = Path(folder), Path(out_dir)
    _check_options(shard_size=shard_size, prefix=prefix, workers=workers)
    if not folder.is_dir():
        raise ConfigError(f"--folder {folder}: no such folder")
    _check_out_dir(out_dir, prefix, overwrite=overwrite, index=index)
    rows = _folder_rows(folder)
    if not rows:
        raise ConfigError(
            f"--folder {folder}: holds no images ({', '.join(sorted(e.lstrip('.') for e in _FOLDER_IMAGE_EXTS))}, "
            "in any case, in it or its subfolders)"
        )
    return _write(rows, out_dir, source={"folder": str(folder)}, shard_size=shard_size, prefix=prefix,
                  overwrite=overwrite, reencode=reencode, workers=workers, index=index)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------- CLI


def _separator(text: str) -> str:
    """'\\t' typed in a shell arrives as a backslash and a t; open_clip's pandas would read it as a regex for a
    tab, so it means a tab here too."""
    return {"\\t": "\t", "tab": "\t"}.get(text, text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``convert`` subcommand's options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="FILE", help="an open_clip CSV (its --dataset-type csv)")
    source.add_argument("--folder", metavar="DIR", help="a folder of images, each with a caption file of the same "
                        "name beside it (cat.jpg + cat.txt), searched recursively")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write the shards and "
                        f"PREFIX.{REPORT} to (created if missing)")  # fmt: skip
    parser.add_argument("--csv-separator", type=_separator, default="\t", metavar="SEP",
                        help="the CSV's field separator, as open_clip's --csv-separator (default: tab)")  # fmt: skip
    parser.add_argument("--csv-img-key", default="filepath", metavar="COLUMN",
                        help="the column of image paths, as open_clip's --csv-img-key (default: filepath)")  # fmt: skip
    parser.add_argument("--csv-caption-key", default="title", metavar="COLUMN",
                        help="the column of captions, as open_clip's --csv-caption-key (default: title)")  # fmt: skip
    parser.add_argument("--root", metavar="DIR", help="the folder relative image paths in the CSV are read from "
                        "(default: the current directory, as open_clip reads them)")  # fmt: skip
    parser.add_argument("--shard-size", type=int, default=10000, metavar="N", help="samples per shard (default: 10000)")
    parser.add_argument("--prefix", default="shard", help="shard file names: PREFIX-000000.tar, ... (default: shard)")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, metavar="N",
                        help=f"threads reading images (default: {DEFAULT_WORKERS}), and processes indexing (at "
                        "most one per core); the output does not depend on it")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace the PREFIX-*.tar shards (and their .idx "
                        "files) already in --out; nothing else there is removed")  # fmt: skip
    parser.add_argument("--reencode", action="store_true", help="re-encode images in formats fastclip does not "
                        "decode (GIF, BMP, TIFF, ...) to PNG, instead of skipping them")  # fmt: skip
    parser.add_argument("--no-index", action="store_true", help="do not index the shards (DALI's .idx files and "
                        "sizes.json); `python -m fastclip.data.shards index` does it later")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """The ``convert`` subcommand: 0 when shards were written, 1 (the reason on stderr) when not."""
    common = dict(shard_size=args.shard_size, prefix=args.prefix, overwrite=args.overwrite, reencode=args.reencode,
                  workers=args.workers, index=not args.no_index)  # fmt: skip
    try:
        if args.csv is not None:
            result = convert_csv(args.csv, args.out, separator=args.csv_separator, image_key=args.csv_img_key,
                                 caption_key=args.csv_caption_key, root=args.root, **common)  # fmt: skip
        else:
            if args.root is not None:
                raise ConfigError("--root applies to --csv (its relative image paths); --folder reads its own files")
            result = convert_folder(args.folder, args.out, **common)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    print(result.summary(), flush=True)
    return 0
