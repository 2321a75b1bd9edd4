"""Shared fixtures: a small synthetic world, generated once per session (helpers to run the trainer: runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process runs of the trainer")


@pytest.fixture(scope="session", autouse=True)
def no_shm_left():
    """Remove, at the end, the DeepSpeed shared-memory files this session's runs (both workers') left: a run killed
    before it let go of them (fastclip.world unnames them once every rank has mapped them) would otherwise hold 66 MiB
    of memory a rank after the suite, on every machine that runs it."""
    import contextlib
    import time

    from runs import shm_buffers

    before = set(shm_buffers())
    yield
    for name in set(shm_buffers()) - before:
        path = Path("/dev/shm") / name
        with contextlib.suppress(FileNotFoundError):  # its run may unname it meanwhile
            if time.time() - path.stat().st_mtime > 120:  # not a file another run is starting up with right now
                path.unlink()


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    """A small synthetic world: 4 train shards x 128 samples, 1 val shard of 100 samples, 48 px images."""
    from fastclip.data.synthetic import WorldSpec, generate

    root = tmp_path_factory.mktemp("world")
    return generate(root, WorldSpec(train_samples=512, val_samples=100, samples_per_shard=128, image_size=48, seed=3))


@pytest.fixture(autouse=True)
def console():
    """fastclip's console as a run sets it up (the entry point, the Trainer): its lines and warnings reach the
    test's stdout and stderr, from loader worker processes too, instead of pytest's own log capture."""
    from fastclip import console

    console.setup(0)
    return console


@pytest.fixture
def warnings_log(tmp_path):
    """The run's warnings as written by every process, loader workers included, read back as one text.

    pytest's capfd is not enough for lines from forked worker processes: once in a whole-suite run their lines
    overwrote each other in its capture file (a log that began mid-word). Each line here is one append to a file
    opened with O_APPEND, which no other process's write can overwrite."""
    import logging

    path = tmp_path / "warnings.log"
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.WARNING)
    logging.getLogger("fastclip").addHandler(handler)
    try:
        yield lambda: path.read_text(encoding="utf-8") if path.exists() else ""
    finally:
        logging.getLogger("fastclip").removeHandler(handler)
        handler.close()
