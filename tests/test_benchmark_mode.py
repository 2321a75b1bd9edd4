"""``--train.benchmark N``: the user's own configuration measured, data excluded and included, on 1 and 2 ranks;
one table, a JSON file, nothing checkpointed or evaluated."""

from __future__ import annotations

import json
import statistics
import sys

from runs import ROOT, deepspeed_cmd, run_cli, small_run_args


def _check(proc):
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]


def test_benchmark_mode_on_one_and_two_ranks_matches_the_trainers_own_rate(world_dir, tmp_path):
    args = small_run_args(world_dir, tmp_path / "train", steps=6) + ["--data.val_shards", "null"]
    _check(run_cli([sys.executable, "-m", "fastclip.train", *args], cwd=ROOT, timeout=300))
    logged = [json.loads(x) for x in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines()]
    trainer_rate = statistics.median(r["samples_per_second_per_gpu"] for r in logged if r["step"] > 2)

    for ranks in (1, 2):
        out = tmp_path / f"bench{ranks}"
        args = small_run_args(world_dir, out, steps=8) + ["--train.benchmark", "4", "--train.benchmark_warmup", "1"]
        launch = [sys.executable, str(ROOT / "fastclip" / "train.py")] if ranks == 1 else deepspeed_cmd(2, 29660)
        proc = run_cli([*launch, *args], cwd=ROOT, timeout=400)
        _check(proc)
        report = json.loads((out / "benchmark.json").read_text())
        assert report["world_size"] == ranks and report["steps"] == 4 and report["global_batch"] == 16 * ranks
        assert report["versions"]["deepspeed"] and report["card"].startswith("CPU")
        assert "samples/s/GPU" in proc.stdout and "data excluded" in proc.stdout and "data included" in proc.stdout
        for phase in ("data excluded", "data included"):
            m = report["phases"][phase]
            assert m["samples_per_second_per_gpu"] > 0 and 0 <= m["data_time_share"] < 1
            assert m["step_time_p10_s"] <= m["step_time_median_s"] <= m["step_time_p90_s"]
            assert m["mfu"] is None and m["peak_memory_gb"] is None  # a CPU: no peak known, no device memory
        assert not (out / "checkpoints").exists()  # nothing saved
        assert not (out / "metrics.jsonl").read_text()  # no log lines, no eval: the measured steps are the table's
        if ranks == 1:  # the same configuration trained: the rates agree within a 2-core machine's noise
            rate = report["phases"]["data excluded"]["samples_per_second_per_gpu"]
            assert trainer_rate / 3 < rate < trainer_rate * 3, (rate, trainer_rate)
