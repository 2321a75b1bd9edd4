"""Markdown tables of the newest saved benchmark results (one CPU file, one GPU file), for docs/benchmarks.md.

    python benchmarks/report.py                # print the tables
    python benchmarks/report.py --update-docs  # rewrite docs/benchmarks.md's section between the bench markers

Generated from benchmarks/results/*.json only; nothing here is typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PAGE = Path(__file__).parents[1] / "docs" / "benchmarks.md"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _latest(kind: str) -> list[Path]:
    """The newest full run's file (on the CPU, with the files of single suites saved after it: their own tables);
    on a GPU every file of that day (the suite and its precheck are two files)."""
    files = []
    for path in RESULTS.glob("*.json"):
        data = json.loads(path.read_text())
        if data.get("quick"):
            continue
        is_gpu = bool(data["machine"].get("cuda"))
        if is_gpu == (kind == "gpu"):
            files.append((data["date"], path))
    if not files:
        return []
    if kind == "cpu":  # the newest whole run, and the one-suite files saved since (bench_remote.py's, ...)
        whole = [(d, p) for d, p in files if "-" not in p.stem.removeprefix("cpu-")[len("YYYY-MM-DD") :]]
        newest = max(whole or files)
        return [newest[1]] + [p for d, p in sorted(files) if d > newest[0] and p != newest[1]]
    newest = max(files)
    return [p for d, p in sorted(files, reverse=True) if d[:10] == newest[0][:10]]


def _fmt(value, metric: str) -> str:
    if value is None:
        return "—"
    if metric == "seconds":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    if metric == "bytes":
        return f"{value / 2**20:.0f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"
    if metric == "flop_per_second":
        return f"{value / 1e12:.0f} TFLOP/s"
    if metric == "abs_error":
        return f"{value:.1e}"
    if metric == "contrastive_batch":
        return f"{value:,.0f}"
    return f"{value:,.1f}"


def _params(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items() if k not in ("device", "threads"))


def _rates(extra: dict) -> str:
    """The index tool's speeds (bench_data_scale.py): MB/s and shards/s of fastclip and of its baseline."""
    ours, base = extra.get("fastclip"), extra.get("baseline")
    if not isinstance(ours, dict) or "mb_per_s" not in ours or not isinstance(base, dict):
        return ""
    return (f"fastclip {ours['mb_per_s']:,.0f} MB/s ({ours['shards_per_s']:,.1f} shards/s), baseline "
            f"{base['mb_per_s']:,.0f} MB/s ({base['shards_per_s']:,.1f} shards/s)")  # fmt: skip


def table(path: Path) -> str:
    data = json.loads(path.read_text())
    m = data["machine"]
    where = m.get("gpu") or f"{m['cpu_count']}-core CPU ({m['cpu']})"
    versions = f"torch {m['torch']}, triton {m['triton']}, open_clip {m.get('open_clip', '?')}"
    if m.get("driver"):
        versions += f", driver {m['driver']}"
    lines = [f"**{where}**, {data['date'][:10]}, {versions} (`{path.relative_to(Path(__file__).parents[1])}`)", ""]
    if data.get("commit") or data.get("note"):
        lines += [" ".join(x for x in (f"Commit {data['commit']}." if data.get("commit") else "", data.get("note", ""))
                           if x), ""]  # fmt: skip
    lines += [
        "| suite | case | sizes | fastclip | open_clip | ratio | note |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in data["results"]:
        ratio = f"{r['ratio']:.2f}×" if r.get("ratio") is not None else "—"
        extra = r.get("extra") or {}
        note = r.get("note") or ""
        if extra.get("fastclip_tflops"):
            # the useful work the rate counts: ClipLoss's 8N²D unless the figure names its own (SigLipLoss: 6N²D)
            work = extra.get("work", "8N²D")
            note = (note + "; " if note else "") + f"fastclip {extra['fastclip_tflops']:.0f} TFLOP/s of {work}"
            if extra.get("fastclip_of_peak"):
                note += f" ({extra['fastclip_of_peak']:.0%} of the card's bf16 matmul rate)"
        if rates := _rates(extra):
            note = (note + "; " if note else "") + rates
        lines.append(
            f"| {r['suite']} | {r['case']} | {_params(r['params'])} | {_fmt(r['fastclip'], r['metric'])} | "
            f"{_fmt(r['baseline'], r['metric'])} | {ratio} | {note} |"
        )
    return "\n".join(lines)


def report() -> str:
    parts = []
    for kind in ("cpu", "gpu"):
        paths = _latest(kind)
        parts += [table(p) for p in paths] if paths else [f"**{kind.upper()}**: no full run saved yet."]
    parts.append(
        "Ratio = fastclip / open_clip, measured in the same run: below 1 is better for time and memory, above 1 "
        "for samples/s and captions/s."
    )
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--update-docs", action="store_true", help=f"replace the text of {PAGE.name} between {START} and {END}"
    )
    args = parser.parse_args(argv)
    text = report()
    if not args.update_docs:
        print(text)
        return 0
    page = PAGE.read_text()
    if START not in page or END not in page:
        print(f"{PAGE} has no {START} ... {END} section to update", file=sys.stderr)
        return 1
    head, rest = page.split(START, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(f"updated {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
