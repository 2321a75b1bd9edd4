"""``python -m fastclip.data.shards``: the shard tools a user runs once, before training.

index SHARDS... [--workers N] [--index-dir DIR] [--deep]   check every sample, write DALI's index files and
                                                            sizes.json (fastclip/data/index.py)
convert --csv FILE | --folder DIR --out DIR                 write indexed shards (fastclip/data/convert.py)

Exit codes: 0 done; 1 the data is what must change (shards that could not be indexed, a CSV or folder with no
usable sample); 2 a usage or configuration error (the command, before anything is written).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from fastclip.data import convert
from fastclip.data.index import SIZES, index_shards, place_of
from fastclip.data.shard_specs import expand
from fastclip.errors import ConfigError, DataError


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shard files or specs: globs, brace ranges, '::' lists")
    parser.add_argument("--workers", type=int, default=1, help="processes indexing shards in parallel (default 1)")
    parser.add_argument("--index-dir", help="write the index files and summaries here (a read-only shard folder)")
    parser.add_argument("--deep", action="store_true", help="also decode every image (slower; the cheap check "
                        "reads each image's first and last bytes)")  # fmt: skip


def _expand(specs: list[str]) -> list[str]:
    return [p for spec in specs for p in expand(spec, field="shards")]


def _report(found, seconds: float, index_dir: str | None) -> int:
    samples = sum(f.count for f in found)
    megabytes = sum(f.bytes for f in found) / 1e6
    reasons = sum((f.reasons for f in found), Counter())
    broken = [f for f in found if f.error]
    places = sorted({str(place_of(f.path, index_dir)) for f in found})
    print(
        f"indexed {len(found) - len(broken)} of {len(found)} shards: {samples} samples, {megabytes:.1f} MB in "
        f"{seconds:.1f} s ({len(found) / max(seconds, 1e-9):.1f} shards/s, {megabytes / max(seconds, 1e-9):.1f} MB/s)"
    )
    if reasons:
        print(f"left out of the index: {sum(reasons.values())} samples (each listed by key in its shard's "
              "SHARD.report.json, beside the index files)")  # fmt: skip
        for why, n in reasons.most_common():
            print(f"  {n:>8}  {why}")
    notes = sum((f.notes_by_kind for f in found), Counter())
    for note, n in notes.most_common():
        print(f"  note ({n} samples or shards): {note}")
    for f in broken:
        print(f"no index for {f.path}: {f.error}", file=sys.stderr)
    print(f"summaries: {', '.join(str(Path(p) / SIZES) for p in places)}")
    if broken:
        print(f"{len(broken)} shards could not be indexed; a run over them skips them as damaged (counted against "
              "data.max_bad_fraction). Re-create them or remove them from the spec.", file=sys.stderr)  # fmt: skip
    return 1 if broken else 0


def run_index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    paths = _expand(args.shards)
    if args.workers < 1:
        raise ConfigError(f"--workers: must be at least 1, got {args.workers}")
    started = time.perf_counter()
    with tqdm(total=len(paths), unit="shard", disable=len(paths) < 2, file=sys.stderr) as bar:
        try:
            found = index_shards(paths, index_dir=args.index_dir, workers=args.workers, deep=args.deep,
                                 progress=bar.update)  # fmt: skip
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return _report(found, time.perf_counter() - started, args.index_dir)


def _separator(text: str) -> str:
    """'\\t' typed in a shell arrives as a backslash and a t; open_clip's pandas would read it as a regex for a
    tab, so it means a tab here too."""
    return {"\\t": "\t", "tab": "\t"}.get(text, text)


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``convert`` subcommand's options."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", metavar="FILE", help="an open_clip CSV (its --dataset-type csv)")
    source.add_argument("--folder", metavar="DIR", help="a folder of images, each with a caption file of the same "
                        "name beside it (cat.jpg + cat.txt), searched recursively")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write the shards and "
                        f"PREFIX.{convert.REPORT} to (created if missing)")  # fmt: skip
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
    parser.add_argument("--workers", type=int, default=convert.DEFAULT_WORKERS, metavar="N",
                        help=f"threads reading images (default: {convert.DEFAULT_WORKERS}), and processes indexing (at "
                        "most one per core); the output does not depend on it")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="replace the PREFIX-*.tar shards (and their .idx "
                        "files) already in --out; nothing else there is removed")  # fmt: skip
    parser.add_argument("--reencode", action="store_true", help="re-encode images in formats fastclip does not "
                        "decode (GIF, BMP, TIFF, ...) to PNG, instead of skipping them")  # fmt: skip
    parser.add_argument("--no-index", action="store_true", help="do not index the shards (DALI's .idx files and "
                        "sizes.json); `python -m fastclip.data.shards index` does it later")  # fmt: skip


def run_convert(args: argparse.Namespace) -> int:
    """The ``convert`` subcommand: 0 when shards were written; a ConfigError (exit 2) or DataError (exit 1) when
    not."""
    common = dict(shard_size=args.shard_size, prefix=args.prefix, overwrite=args.overwrite, reencode=args.reencode,
                  workers=args.workers, index=not args.no_index)  # fmt: skip
    if args.csv is not None:
        result = convert.convert_csv(args.csv, args.out, separator=args.csv_separator, image_key=args.csv_img_key,
                             caption_key=args.csv_caption_key, root=args.root, **common)  # fmt: skip
    else:
        if args.root is not None:
            raise ConfigError("--root applies to --csv (its relative image paths); --folder reads its own files")
        result = convert.convert_folder(args.folder, args.out, **common)
    print(result.summary(), flush=True)
    return 0


EXIT_CODES = "exit codes: 0 done; 1 the data must change (a shard not indexed, no usable sample); 2 a usage error"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastclip.data.shards",
        description="Shard tools to run once before training: index shards (the counts start-up reads, and "
        "DALI's index files), or convert a CSV or a folder of images into indexed shards.",
        epilog=EXIT_CODES,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _index_arguments(commands.add_parser("index", help="check every sample and write DALI's index files",
                                         epilog=EXIT_CODES))  # fmt: skip
    _convert_arguments(commands.add_parser("convert", help="write indexed shards from a CSV or a folder",
                                           epilog=EXIT_CODES))  # fmt: skip
    args = parser.parse_args(argv)
    try:
        return run_index(args) if args.command == "index" else run_convert(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1 if isinstance(e, DataError) else 2


if __name__ == "__main__":
    raise SystemExit(main())
