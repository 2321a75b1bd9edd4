"""Shared fixtures: a small synthetic world (generated once per session) and helpers to run the trainer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped without it")
    config.addinivalue_line("markers", "slow: multi-process runs of the trainer")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def world_dir(tmp_path_factory) -> Path:
    """A small synthetic world: 4 train shards x 128 samples, 1 val shard of 100 samples, 48 px images."""
    from fastclip.data.synthetic import WorldSpec, generate

    root = tmp_path_factory.mktemp("world")
    return generate(root, WorldSpec(train_samples=512, val_samples=100, samples_per_shard=128, image_size=48, seed=3))


def run_cli(args: list[str], *, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    return subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def deepspeed_cmd(num_ranks: int, port: int) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [str(launcher), "--num_gpus", str(num_ranks), "--master_port", str(port), str(ROOT / "fastclip" / "train.py")]


def small_run_args(world: Path, out: Path, *, steps: int, batch: int = 16) -> list[str]:
    """Overrides for a fast run on the ``world_dir`` fixture, with tiny images."""
    return [
        "--data.train_shards", str(world / "train" / "*.tar"),
        "--data.val_shards", str(world / "val" / "*.tar"),
        "--data.zeroshot_classnames", str(world / "classnames.json"),
        "--data.zeroshot_templates", str(world / "templates.json"),
        "--data.batch_size", str(batch),
        "--data.shuffle_buffer", "64",
        "--model.force_image_size", "32",
        "--train.steps", str(steps),
        "--optim.warmup_steps", "2",
        "--log.every", "1",
        "--log.progress", "false",
        "--log.dir", str(out),
        "--checkpoint.dir", str(out / "checkpoints"),
    ]  # fmt: skip
