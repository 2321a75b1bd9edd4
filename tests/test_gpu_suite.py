"""benchmarks/gpu_suite.sh on a CPU (--dry): every stage starts, its CUDA parts skip themselves, the files the suite
promises are written and it exits 0, so the script a GPU lease runs has run here first."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["precheck", "GPU tests", "loss vs open_clip", "AdamW step", "train step ViT-B/32", "data",
          "train step ViT-B/16", "ZeRO stages", "contrastive batch 65,536", "compile ViT-B/32"]  # fmt: skip


def test_dry_run_runs_every_stage(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("FASTCLIP_WHEELS", None)
    out = subprocess.run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path), "--dry"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    for stage in STAGES:
        assert f"== {stage} (limit" in log and f"== {stage}: " in log, (stage, log[-4000:])
    assert {"suite.log", "versions.json", "precheck.jsonl", "gpu_tests.xml"} <= set(os.listdir(tmp_path))
    assert "no CUDA device" in (tmp_path / "precheck.jsonl").read_text()
