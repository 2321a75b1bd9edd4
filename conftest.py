"""Shared by tests/ and benchmarks/: the ``gpu`` marker, whose items skip cleanly without CUDA; the benchmarks'
options (here, so that one session holds both suites, as make test runs them); how make test's two workers share
the machine.

Nothing here touches the device at import time, so both suites collect on a CPU-only machine.
"""

import os

import pytest

# The files that take longest, first (seconds in one process on 2 cores: 270-90, 90-80, 80-65, 60-50, 45-35 by line):
# make test's two workers take a whole file each (--dist loadfile), and a long file taken last leaves the other
# worker idle to the end
LONGEST_FIRST = ["test_multinode.py", "test_accumulation.py", "test_preemption.py", "test_host_sync.py",
                 "test_gpu_suite.py", "test_param_layout.py", "test_checkpoints.py", "test_compile.py",
                 "test_train.py", "test_resume.py", "test_remote_shards.py", "test_benchmark_mode.py",
                 "test_startup.py", "bench_step_parity.py", "bench_train_step.py", "bench_accumulation.py",
                 "test_fused_loss.py", "bench_scaling.py", "test_siglip.py", "test_data_integrity.py"]  # fmt: skip


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="benchmarks: small sizes and one run per case (CI)")
    parser.addoption("--results", default=None, help="benchmarks: where to write the results JSON")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
        # two test processes share the cores: one intra-op thread each, and each rank they start one too (as torchrun
        # gives its ranks); a second thread per process only contends (a third of the suite: 13% slower, measured)
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    import torch

    if os.environ.get("PYTEST_XDIST_WORKER"):  # not in one process: make bench writes its figures in run order
        first = {name: i for i, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: first.get(item.path.name, len(first)))  # stable: the rest keep their order
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
