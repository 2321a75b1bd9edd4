"""Scaling: the trainer at 1 and 2 ranks (CPU, gloo, the deepspeed launcher), samples/s/GPU with data.

Recorded as fastclip = 2 ranks, baseline = 1 rank, so the ratio is the per-rank efficiency of going
distributed (1.0 = no overhead). On the 2-core CI machine two ranks share the cores, so the ratio there
shows the contention plus the gather/all-reduce cost, not what separate GPUs would see. The loss's memory
against N is in the loss suite (linear for fastclip, quadratic for open_clip).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench_data import _shards
from harness import Result, bench_once

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"full": 30, "quick": 4}


def _run(ranks: int, root: Path, out: Path, steps: int, port: int) -> float:
    launcher = Path(sys.executable).parent / "deepspeed"
    args = [
        str(launcher), "--num_gpus", str(ranks), "--master_port", str(port), str(ROOT / "fastclip" / "train.py"),
        "--data.train_shards", str(root / "train" / "*.tar"), "--data.val_shards", "null",
        "--data.batch_size", "64", "--data.shuffle_buffer", "256", "--train.steps", str(steps),
        "--log.every", str(max(steps // 2, 1)), "--log.progress", "false", "--log.dir", str(out),
        "--checkpoint.dir", str(out / "ckpt"), "--checkpoint.export_open_clip", "false",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks}-rank run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "samples_per_second_per_gpu" in r][-1]["samples_per_second_per_gpu"]  # 2nd half


def test_rank_scaling_cpu(benchmark, record, quick, tmp_path):
    mode = "quick" if quick else "full"
    root = _shards(mode)
    steps = STEPS[mode]
    one = _run(1, root, tmp_path / "one", steps, 29721)
    two = bench_once(benchmark, lambda: _run(2, root, tmp_path / "two", steps, 29722))
    params = {
        "model": "fastclip-tiny",
        "batch_per_rank": 64,
        "ranks": "2 vs 1",
        "cores": os.cpu_count(),
        "device": "cpu",
    }
    record(Result("scaling", "samples/s/GPU at 2 ranks vs 1", params, "samples_per_second", two, one,
                  extra={"aggregate_2_over_1": 2 * two / one},
                  note=f"ranks share the CPU cores; ratio = per-rank efficiency, aggregate {2 * two / one:.2f}x",
                  ))  # fmt: skip
