"""Helpers to run the trainer as users do (subprocesses, the deepspeed launcher) on the ``world_dir`` fixture."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(
    args: list[str], *, cwd: Path, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=clean_env(env), capture_output=True, text=True, timeout=timeout)


def clean_env(extra: dict | None = None) -> dict:
    """This environment without a launcher's rank variables, so a child starts its own world."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def deepspeed_cmd(num_ranks: int, port: int) -> list[str]:
    launcher = Path(sys.executable).parent / "deepspeed"
    return [
        str(launcher),
        "--num_gpus",
        str(num_ranks),
        "--master_port",
        str(port),
        str(ROOT / "fastclip" / "train.py"),
    ]


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
