"""Global numerics: TF32 only on CUDA, and every test's changes to torch's flags undone."""

import subprocess
import sys

import torch

from runs import ROOT


def test_tf32_only_on_cuda():
    from fastclip.precision import configure_matmuls

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    try:
        configure_matmuls(torch.device("cpu"), tf32=True)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
        configure_matmuls(torch.device("cuda", 0), tf32=False)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
        configure_matmuls(torch.device("cuda", 0), tf32=True)  # flags only: no device needed
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_global_torch_flags_are_restored_after_each_test(tmp_path):
    """The root conftest's restore_torch_flags puts back what a test changed (a Trainer on CUDA turns TF32 and
    cuDNN autotuning on), so no test's numbers depend on which tests ran before it: two tests in order, the
    first changing the flags, under a copy of the root conftest, in a pytest of their own (run alone, as with -k,
    the check would pass whether or not anything was restored)."""
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    (tmp_path / "test_order.py").write_text(
        "import torch\n\n"
        "def test_1_changes_them():\n"
        "    torch.set_float32_matmul_precision('high')\n"
        "    torch.backends.cudnn.benchmark = True\n\n"
        "def test_2_finds_them_restored():\n"
        "    assert torch.get_float32_matmul_precision() == 'highest' and not torch.backends.cudnn.benchmark\n"
    )
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-2000:]
