"""Benchmark session: ``--quick`` (small sizes, one run: what CI does so the suites cannot rot) and the results
file (``--results PATH``; the full run defaults to benchmarks/results/<device>-<date>.json)."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Result, machine  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small sizes and one run per case (CI)")
    parser.addoption("--results", default=None, help="where to write the results JSON")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return bool(request.config.getoption("--quick"))


_RESULTS: list[Result] = []


@pytest.fixture(scope="session")
def record():
    """record(Result(...)): keep a paired figure for the session's results file."""
    return _RESULTS.append


def pytest_sessionfinish(session, exitstatus):
    if not _RESULTS:
        return
    config = session.config
    path = config.getoption("--results")
    info = machine()
    if path is None:
        if config.getoption("--quick"):
            return  # quick runs only check that the suites work; their numbers are not kept
        device = info.get("gpu", "cpu").replace(" ", "-")
        path = RESULTS_DIR / f"{device}-{dt.date.today().isoformat()}.json"
    results = [r.to_json() for r in _RESULTS]
    if Path(path).exists():  # a partial rerun replaces its own suites and keeps the others' figures
        ran = {r["suite"] for r in results}
        kept = [r for r in json.loads(Path(path).read_text())["results"] if r["suite"] not in ran]
        results = kept + results
    payload = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(config.getoption("--quick")),
        "machine": info,
        "results": results,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))
    print(f"\nbenchmark results: {path}")
