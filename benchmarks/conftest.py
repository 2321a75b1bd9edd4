"""Benchmark session: ``--quick`` (small sizes, one run: what CI does so the suites cannot rot) and the results
file (``--results PATH``; the full run defaults to benchmarks/results/<device>-<date>.json); both options are
registered in the root conftest.py, so that one session can hold the tests and the benchmarks."""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Result, machine  # noqa: E402

RESULTS_DIR = Path(__file__).parent / "results"


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return bool(request.config.getoption("--quick"))


_RESULTS: list[Result] = []
_PREVIOUS: list[dict] = []  # the results file as the session found it


def _results_path(config) -> Path | None:
    path = config.getoption("--results")
    if path is not None:
        return Path(path)
    if config.getoption("--quick"):
        return None  # quick runs only check that the suites work; their numbers are not kept
    device = machine().get("gpu", "cpu").replace(" ", "-")
    return RESULTS_DIR / f"{device}-{dt.date.today().isoformat()}.json"


def _key(result: dict) -> tuple:
    """A figure's identity: its suite, case and sizes."""
    return result["suite"], result["case"], json.dumps(result["params"], sort_keys=True)


def _write(config) -> None:
    path = _results_path(config)
    if path is None or not _RESULTS:
        return
    results = [r.to_json() for r in _RESULTS]
    ran = {_key(r) for r in results}
    payload = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": bool(config.getoption("--quick")),
        "machine": machine(),
        # a partial rerun (-k CASE) replaces the figures it measured and keeps every other one
        "results": [r for r in _PREVIOUS if _key(r) not in ran] + results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def pytest_sessionstart(session):
    path = _results_path(session.config)
    if path is not None and path.exists():
        _PREVIOUS.extend(json.loads(path.read_text())["results"])


@pytest.fixture(scope="session")
def record(request):
    """record(Result(...)): keep a paired figure; the results file is rewritten at once, so a run cut off by
    its time limit keeps every figure measured before the cut."""

    def _record(result: Result) -> None:
        # a case may record twice: its own figure first, then with the baseline's once that is measured
        _RESULTS[:] = [r for r in _RESULTS if (r.suite, r.case, r.params) != (result.suite, result.case, result.params)]
        _RESULTS.append(result)
        _write(request.config)

    return _record


def pytest_sessionfinish(session, exitstatus):
    path = _results_path(session.config)
    if path is not None and _RESULTS:
        print(f"\nbenchmark results: {path}")
