"""``python -m fastclip.data.shards``: the shard tools a user runs once, before training.

index SHARDS... [--workers N] [--index-dir DIR] [--deep]   check every sample, write DALI's index files and
                                                            sizes.json (fastclip/data/index.py)
convert --csv FILE | --folder DIR --out DIR                 write indexed shards (fastclip/data/convert.py)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from fastclip.errors import ConfigError


def _index_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("shards", nargs="+", help="shard files or specs: globs, brace ranges, '::' lists")
    parser.add_argument("--workers", type=int, default=1, help="processes indexing shards in parallel (default 1)")
    parser.add_argument("--index-dir", help="write the index files and summaries here (a read-only shard folder)")
    parser.add_argument("--deep", action="store_true", help="also decode every image (slower; the cheap check "
                        "reads each image's first and last bytes)")  # fmt: skip


def _expand(specs: list[str]) -> list[str]:
    from fastclip.data.shards import expand

    return [p for spec in specs for p in expand(spec, field="shards")]


def _report(found, seconds: float, index_dir: str | None) -> int:
    from fastclip.data.index import SIZES, place_of

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

    from fastclip.data.index import index_shards

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


def main(argv: list[str] | None = None) -> int:
    from fastclip.data import convert

    parser = argparse.ArgumentParser(
        prog="python -m fastclip.data.shards",
        description="Shard tools to run once before training: index shards (the counts start-up reads, and "
        "DALI's index files), or convert a CSV or a folder of images into indexed shards.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _index_arguments(commands.add_parser("index", help="check every sample and write DALI's index files"))
    convert.add_arguments(commands.add_parser("convert", help="write indexed shards from a CSV or a folder"))
    args = parser.parse_args(argv)
    try:
        return run_index(args) if args.command == "index" else convert.run(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
