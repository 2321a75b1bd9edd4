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

import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fastclip.console import counted
from fastclip.data.convert_rows import (
    FOLDER_IMAGE_EXTS,
    Row,
    Skip,
    check_columns,
    check_root,
    csv_rows,
    folder_rows,
    in_order,
    load,
    read_header,
)  # fmt: skip
from fastclip.data.index import SIZES, ShardIndex, index_shards
from fastclip.data.shard_writer import KEY_DIGITS, ShardWriter, check_out_dir
from fastclip.errors import ConfigError, DataError

REPORT = "convert_report.json"  # DIR/PREFIX.convert_report.json: report_path
DEFAULT_WORKERS = 8  # threads reading image files: I/O, so more than the cores


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
        lines = [f"wrote {counted(self.written, 'sample')} in {counted(len(self.shards), 'shard')} to {self.out_dir}"]
        if self.skipped:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.skipped_by_reason().most_common())
            lines.append(f"skipped {len(self.skipped)} of {self.rows} {self.unit}: {reasons} (each listed in "
                         f"{self.report})")  # fmt: skip
        if self.reencoded:
            lines.append(f"re-encoded {counted(self.reencoded, 'image')} to PNG")
        if self.replaced:
            lines.append(
                f"{counted(len(self.replaced), 'caption file')} not valid UTF-8 (e.g. {self.replaced[0]}): their "
                f"undecodable bytes became U+FFFD (listed in {self.report}); re-save them as UTF-8 to keep them"
            )
        if self.indexed is not None:
            left_out = sum(f.left_out for f in self.indexed)
            lines.append(f"indexed: a .idx beside each shard, the counts in {self.out_dir / SIZES}"
                         + (f"; the index left out {counted(left_out, 'sample')} (see the shards' .report.json)"
                            if left_out else ""))  # fmt: skip
        return "\n".join(lines)


def _check_options(*, shard_size: int, prefix: str, workers: int) -> None:
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if not prefix or "/" in prefix or os.sep in prefix:
        raise ConfigError(f"--prefix must be a file name without '/', got {prefix!r}")


def _write(
    rows: Sequence[Row], out_dir: Path, *, source: dict, shard_size: int, prefix: str, overwrite: bool, reencode: bool,
    workers: int, index: bool,
) -> ConvertResult:  # fmt: skip
    old = check_out_dir(out_dir, prefix, overwrite=overwrite, index=index)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, prefix, shard_size, old)
    skipped, replaced, reencoded, key = [], [], 0, 0
    try:
        for row, got in in_order(lambda r: load(r, reencode=reencode), rows, workers):
            if isinstance(got, Skip):
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
        raise DataError(
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
    check_columns(csv_path, read_header(csv_path, separator), separator=separator, image_key=image_key,
                   caption_key=caption_key)  # fmt: skip
    check_out_dir(out_dir, prefix, overwrite=overwrite, index=index)  # before reading a large file, too
    rows = csv_rows(csv_path, separator=separator, image_key=image_key, caption_key=caption_key, root=root)
    if not rows:
        raise DataError(f"--csv {csv_path}: has a header but no rows")
    check_root(csv_path, rows, root)
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
    check_out_dir(out_dir, prefix, overwrite=overwrite, index=index)
    rows = folder_rows(folder)
    if not rows:
        raise DataError(
            f"--folder {folder}: holds no images ({', '.join(sorted(e.lstrip('.') for e in FOLDER_IMAGE_EXTS))}, "
            "in any case, in it or its subfolders)"
        )
    return _write(rows, out_dir, source={"folder": str(folder)}, shard_size=shard_size, prefix=prefix,
                  overwrite=overwrite, reencode=reencode, workers=workers, index=index)  # fmt: skip
