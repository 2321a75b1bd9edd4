"""benchmarks/gpu_suite.sh on a CPU (--dry): every stage starts, its CUDA parts skip themselves, the files the suite
promises are written and it exits 0, so the script a GPU lease runs has run here first. benchmarks/gpu_dali.sh
likewise: its parts stashed call by call, a damaged one asked for again, the set installed and its checks run."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["precheck", "GPU tests", "loss vs open_clip", "AdamW step", "train step ViT-B/32", "data",
          "train step ViT-B/16", "ZeRO stages", "contrastive batch 65,536", "compile ViT-B/32"]  # fmt: skip


def _dry_run(script: str, out, stages: list[str]) -> str:
    """``script`` with --dry on this CPU: exit 0, each stage started and ended; its log."""
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("FASTCLIP_WHEELS", None)
    proc = subprocess.run(["bash", script, str(out), "--dry"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    for stage in stages:
        assert f"== {stage} (limit" in log and f"== {stage}: " in log, (stage, log[-4000:])
    return log


def test_dry_run_runs_every_stage(tmp_path):
    _dry_run("benchmarks/gpu_suite.sh", tmp_path, STAGES)
    assert {"suite.log", "versions.json", "precheck.jsonl", "gpu_tests.xml"} <= set(os.listdir(tmp_path))
    assert "no CUDA device" in (tmp_path / "precheck.jsonl").read_text()


PARITY_STAGES = ["alignment kernels", "step parity ViT-B/32 large batch", "step parity ViT-B/32 batch 256",
                 "compile step ViT-B/32 large batch"]  # fmt: skip


def test_parity_call_dry_run_runs_every_stage(tmp_path):
    """benchmarks/gpu_parity.sh, the prepared GPU call of step parity: every stage names a test that exists (pytest
    would exit 4 on a wrong id, and the call with it) and the files it promises are written."""
    log = _dry_run("benchmarks/gpu_parity.sh", tmp_path, PARITY_STAGES)
    assert log.count("1 skipped") == len(PARITY_STAGES)  # each a GPU test, skipped here
    assert {"suite.log", "versions.json"} <= set(os.listdir(tmp_path))


def _probe_wheel(into: Path) -> None:
    """A minimal installable wheel, one module, standing in for DALI's (the real ones are 250 MB)."""
    dist = "fastclip_dali_probe-0.1.dist-info"
    files = {
        "fastclip_dali_probe.py": "VALUE = 1\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: fastclip_dali_probe\nVersion: 0.1\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(into / "fastclip_dali_probe-0.1-py3-none-any.whl", "w") as whl:
        for name, text in files.items():
            whl.writestr(name, text)
        whl.writestr(f"{dist}/RECORD", "".join(f"{name},,\n" for name in [*files, f"{dist}/RECORD"]))


def _dali_parts(tmp_path: Path) -> Path:
    """Parts laid out as `benchmarks/prepare_wheels.sh --dali` lays them out (wheels/ in one tar, split, a manifest
    of checksums), of a probe wheel and 5 KB of padding (a 10 KiB tar) cut into 4 KiB parts: part-00 to part-02."""
    src = tmp_path / "src"
    (src / "wheels").mkdir(parents=True)
    _probe_wheel(src / "wheels")
    (src / "wheels" / "padding.bin").write_bytes(os.urandom(5000))
    cmd = "tar -cf dali.tar wheels && split -b 4K -d -a 2 dali.tar part- && sha256sum dali.tar part-* > manifest.txt"
    subprocess.run(["bash", "-c", cmd], cwd=src, check=True)
    return src


def test_dali_parts_travel_one_call_at_a_time(tmp_path):
    src = _dali_parts(tmp_path)
    parts = sorted(p.name for p in src.glob("part-*"))
    assert parts == ["part-00", "part-01", "part-02"]
    stash = tmp_path / "stash"

    def call(n: int, part: str, damage: bool = False) -> tuple[int, str]:
        carried = tmp_path / f"call-{n}"
        carried.mkdir()
        shutil.copy(src / "manifest.txt", carried)
        data = (src / part).read_bytes()
        (carried / part).write_bytes(data[:-1] if damage else data)
        env = {**os.environ, "PYTHON": sys.executable, "FASTCLIP_DALI_PARTS": str(carried),
               "FASTCLIP_DALI_STASH": str(stash), "TMPDIR": str(tmp_path)}  # fmt: skip
        env.pop("FASTCLIP_WHEELS", None)
        out = subprocess.run(["bash", "benchmarks/gpu_dali.sh", str(tmp_path / f"out-{n}"), "--dry"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        return out.returncode, out.stdout + out.stderr

    rc, log = call(0, "part-00")
    assert rc == 3 and "still missing part-01 part-02" in log, log
    rc, log = call(1, "part-01", damage=True)  # cut short in transit
    assert rc == 3 and "part-01 does not match its checksum" in log and "still missing part-01 part-02" in log, log
    rc, log = call(2, "part-01")
    assert rc == 3 and "still missing part-02" in log, log
    rc, log = call(3, "part-02")
    assert rc == 0, log[-4000:]
    assert "installed 1 wheels" in log and "gpu_dali: DALI" in log and "done, status 0" in log
    assert (stash / "site" / "fastclip_dali_probe.py").exists() and not list(stash.glob("part-*"))
    assert {"dali.log", "dali_tests.xml"} <= set(os.listdir(tmp_path / "out-3"))
