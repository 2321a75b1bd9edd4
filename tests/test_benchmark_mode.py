"""``--train.benchmark N``: the user's own configuration measured, data excluded and included; one table, a JSON
file, nothing checkpointed or evaluated. One rank against the trainer's own rate for the same configuration is in
tests/test_train.py (beside the training run it compares with); two ranks here."""

from __future__ import annotations

import json

from runs import ROOT, deepspeed_cmd, run_cli, small_run_args  # noqa: F401 (ROOT: the checkout the runs use)


def check_report(out, proc, *, ranks: int, steps: int, mfu: bool = False) -> dict:
    """The printed table and benchmark.json of a benchmark run into ``out``: both phases, nothing saved or logged."""
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert report["world_size"] == ranks and report["steps"] == steps and report["global_batch"] == 16 * ranks
    assert report["versions"]["deepspeed"] and report["card"].startswith("CPU")
    assert "samples/s/GPU" in proc.stdout and "data excluded" in proc.stdout and "data included" in proc.stdout
    for phase in ("data excluded", "data included"):
        m = report["phases"][phase]
        assert m["samples_per_second_per_gpu"] > 0 and 0 <= m["data_time_share"] < 1
        assert m["step_time_p10_s"] <= m["step_time_median_s"] <= m["step_time_p90_s"]
        assert (m["mfu"] is not None) == mfu and m["peak_memory_gb"] is None  # a CPU: a peak only if given
    assert not (out / "checkpoints").exists()  # nothing saved
    assert not (out / "metrics.jsonl").read_text()  # no log lines, no eval: the measured steps are the table's
    return report


def test_benchmark_mode_on_two_ranks(world_dir, tmp_path):
    out = tmp_path / "bench2"
    args = small_run_args(world_dir, out, steps=8) + ["--train.benchmark", "4", "--train.benchmark_warmup", "1"]
    proc = run_cli([*deepspeed_cmd(2, 29660), *args], cwd=ROOT, timeout=400)
    report = check_report(out, proc, ranks=2, steps=4)
    assert report["world"].startswith("2 ranks")
