"""The rows a conversion reads (fastclip/data/convert.py): an open_clip CSV's or a folder's, each read into a
sample (image bytes named by their content, caption) or a reason it is skipped; read ahead by threads, in input
order."""

from __future__ import annotations

import difflib
import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fastclip.data.index import TAIL, image_damage, image_format
from fastclip.data.tar_layout import IMAGE_EXTS, OTHER_IMAGE_EXTS
from fastclip.errors import ConfigError, DataError

SEPARATORS = ("\t", ",", ";", "|")  # what a header that parsed as one column is checked for
READ_AHEAD = 4  # rows in flight per worker: enough to hide latency, bounded so that memory is

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

FOLDER_IMAGE_EXTS = {f".{e}" for e in IMAGE_EXTS + OTHER_IMAGE_EXTS}  # others are listed, or re-encoded


@dataclass
class Row:
    """One input row: what it names, before any file is read."""

    where: dict  # how the report names it: {"row": n, "image": path} or {"path": relative path}
    source: str  # the image as the input names it (the sample's json "source")
    image: Path | None  # the file to read; None when the row names none
    caption: str | None = None  # CSV: the caption cell
    caption_file: Path | None = None  # folder: the .txt beside the image


@dataclass
class Skip:
    reason: str
    detail: str = ""


@dataclass
class Sample:
    ext: str  # 'jpg', 'png' or 'webp'
    image: bytes
    caption: str
    original_format: str | None = None  # set when re-encoded: 'gif', 'bmp', ...
    caption_replaced: bool = False  # folder: the caption file was not valid UTF-8


# ---------------------------------------------------------------------------------------------------------- CSV


def read_header(csv_path: Path, separator: str) -> list[str]:
    import pandas as pd

    try:
        return [str(c) for c in pd.read_csv(csv_path, sep=separator, nrows=0).columns]
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: the file is empty; it needs a header row naming its columns") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise _unreadable(csv_path, separator, e) from None


def _unreadable(csv_path: Path, separator: str, e: Exception) -> DataError:
    """The file's text is what must change (or, for a table, the separator it was read with: said too)."""
    if isinstance(e, UnicodeDecodeError):  # open_clip's read fails alike: pandas reads UTF-8 unless told
        return DataError(f"{csv_path}: is not UTF-8 text ({e.reason} in its first {e.end} bytes); re-save it as UTF-8")
    return DataError(
        f"{csv_path}: does not parse as a table separated by {separator!r}: {str(e).strip()}. A field that holds the "
        'separator needs quotes ("..."); check --csv-separator'
    )


def check_columns(csv_path: Path, columns: list[str], *, separator: str, image_key: str, caption_key: str) -> None:
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


class CsvRows(Sequence):
    """The CSV's rows, each made a :class:`Row` when it is read: two lists of strings are what a CSV of millions
    of rows can afford to hold (open_clip holds the same), not an object per row."""

    def __init__(self, images: list, captions: list, root: Path | None):
        self.images, self.captions, self.root = images, captions, root

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Row:
        image, caption = self.images[i], self.captions[i]
        image = image if isinstance(image, str) else ""  # a short row's missing fields come back as NaN
        caption = caption if isinstance(caption, str) else ""
        path = None if not image.strip() else (self.root / image if self.root is not None else Path(image))
        return Row({"row": i + 1, "image": image}, image, path, caption=caption)


def csv_rows(csv_path: Path, *, separator: str, image_key: str, caption_key: str, root: Path | None) -> CsvRows:
    import pandas as pd

    # every field as text: pandas' guesses would turn a caption 'NA' into NaN and an image '007' into 7. All
    # columns, as open_clip reads them: with usecols pandas cuts a row with too many fields short without a word
    try:
        df = pd.read_csv(csv_path, sep=separator, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise _unreadable(csv_path, separator, e) from None
    return CsvRows(df[image_key].tolist(), df[caption_key].tolist(), root)


def check_root(csv_path: Path, rows: CsvRows, root: Path | None, probe: int = 100) -> None:
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


def folder_rows(folder: Path) -> list[Row]:
    found = []
    for here, files in _walk_sorted(folder):
        captions = {Path(f).stem: here / f for f in files if Path(f).suffix.lower() == ".txt"}
        for f in files:
            if Path(f).suffix.lower() in FOLDER_IMAGE_EXTS and (here / f).is_file():
                rel = (here / f).relative_to(folder)
                found.append((rel.parts, rel, captions.get(Path(f).stem)))
    found.sort(key=lambda t: t[0])  # by path components: a folder's files together, the same order on any machine
    return [Row({"path": rel.as_posix()}, rel.as_posix(), folder / rel, caption_file=txt) for _, rel, txt in found]


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


def _read_image(path: Path, *, reencode: bool) -> tuple[str, bytes, str | None] | Skip:
    """(extension, bytes, the format it was re-encoded from or None), or why the row is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return Skip(IMAGE_NOT_FOUND, str(path))
    except OSError as e:  # a folder, no permission, an I/O error
        return Skip(IMAGE_UNREADABLE, f"{path}: {e.strerror or e}")
    if not data:
        return Skip(NOT_AN_IMAGE, f"{path} is an empty file")
    ext = _image_format(data)
    if ext is not None:
        why = _damage(ext, data)
        return Skip(DAMAGED_IMAGE, f"{path}: {why}") if why else (ext, data, None)
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format or "unknown"
    except Exception:  # Pillow raises UnidentifiedImageError, and others for a header it half reads
        return Skip(NOT_AN_IMAGE, f"{path} is not a JPEG, PNG or WebP, nor an image Pillow reads (it starts with "
                     f"{data[:8].hex(' ')})")  # fmt: skip
    if not reencode:
        return Skip(OTHER_FORMAT, f"{path} is a {fmt} image; fastclip decodes JPEG, PNG and WebP: pass --reencode "
                     "to convert it to PNG")  # fmt: skip
    try:
        return "png", _to_png(image), fmt.lower()
    except Exception as e:  # a damaged GIF/TIFF fails here, at decode
        return Skip(REENCODE_FAILED, f"{path}: {fmt} to PNG: {e}")


def _read_caption(row: Row) -> tuple[str, bool] | Skip:
    """(caption, whether undecodable bytes were replaced), or why the row is skipped."""
    if row.caption_file is None and row.caption is None:
        return Skip(NO_CAPTION_FILE, f"no {Path(row.source).stem}.txt beside {row.source}")
    replaced = False
    if row.caption_file is not None:
        try:
            raw = row.caption_file.read_bytes()
        except OSError as e:
            return Skip(CAPTION_UNREADABLE, f"{row.caption_file}: {e.strerror or e}")
        try:
            text = raw.decode("utf-8-sig")  # a BOM, as Windows' Notepad writes, is not part of the caption
        except UnicodeDecodeError:
            text, replaced = raw.decode("utf-8-sig", errors="replace"), True
    else:
        text = row.caption
    text = text.strip()
    if not text:
        where = row.caption_file if row.caption_file is not None else f"column for row {row.where.get('row')}"
        return Skip(EMPTY_CAPTION, f"the caption ({where}) is empty")
    return text, replaced


def load(row: Row, *, reencode: bool) -> Sample | Skip:
    """A row's sample, or why it has none: the caption first (no image read for a row that is skipped anyway)."""
    caption = _read_caption(row)
    if isinstance(caption, Skip):
        return caption
    if row.image is None:
        return Skip(NO_IMAGE_PATH, f"the image cell of row {row.where.get('row')} is empty")
    image = _read_image(row.image, reencode=reencode)
    if isinstance(image, Skip):
        return image
    ext, data, original = image
    return Sample(ext, data, caption[0], original_format=original, caption_replaced=caption[1])


def in_order(load: Callable[[Row], object], rows: Iterable[Row], workers: int) -> Iterator[tuple[Row, object]]:
    """(row, load(row)) in input order, ``workers`` threads loading ahead: the output does not depend on which
    read finishes first, and at most ``workers * READ_AHEAD`` rows' bytes are held."""
    if workers <= 1:
        for row in rows:
            yield row, load(row)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="convert-read") as pool:
        window: deque[tuple[Row, Future]] = deque()
        try:
            for row in rows:
                window.append((row, pool.submit(load, row)))
                if len(window) >= workers * READ_AHEAD:
                    done, future = window.popleft()
                    yield done, future.result()
            while window:
                done, future = window.popleft()
                yield done, future.result()
        finally:  # the writer stopped (an error, Ctrl-C): do not read the rest of the window
            for _, future in window:
                future.cancel()
