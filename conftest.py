"""Shared by tests/ and benchmarks/: the ``gpu`` marker, whose items skip cleanly without CUDA.

Nothing here touches the device at import time, so both suites collect on a CPU-only machine.
"""

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def single_rank():
    """A one-rank process group for in-process trainers, kept for the whole session: DeepSpeed caches its groups,
    so a second engine in the same process needs the first's process group, not a new one."""
    from fastclip.distributed import close_distributed, init_distributed

    yield init_distributed()
    close_distributed()
