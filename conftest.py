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
    from fastclip.world import close_distributed, join_world

    yield join_world()
    close_distributed()


def _torch_flags():
    import torch

    return (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.get_default_dtype(),
        torch.are_deterministic_algorithms_enabled(),
    )


@pytest.fixture(autouse=True)
def restore_torch_flags():
    """Global torch settings a test changes (a Trainer on CUDA turns TF32 and cuDNN autotuning on) are put back,
    so that no test's numbers depend on which tests ran before it."""
    import torch

    before = _torch_flags()
    yield
    if _torch_flags() != before:
        precision, benchmark, cudnn_tf32, matmul_tf32, dtype, deterministic = before
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = benchmark, cudnn_tf32
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(deterministic)
