"""``--train.benchmark N``: the user's own configuration measured, data excluded and included; one table, a JSON
file, nothing checkpointed or evaluated. One rank against the trainer's own rate for the same configuration is in
tests/test_train.py (beside the training run it compares with). With ``--train.benchmark_try``, several settings
of it in alternating rounds (fastclip/benchmark_sweep.py), each measured by the same code: on two ranks here (the
one two-rank launch of this file: each costs CI a quarter of a minute), and the try string's parsing and errors
on their own."""

from __future__ import annotations

import json
import shlex
import sys

import pytest

from fastclip.benchmark_sweep import ROUNDS
from fastclip.benchmark_try import command_line, settings
from fastclip.cli import parse_args
from fastclip.errors import ConfigError
from fastclip.world import free_port

from runs import ROOT, TRAIN, deepspeed_cmd, run_cli, shm_buffers, small_run_args


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
    kinds = report["step_breakdown_ms"]  # one more step profiled: the tiny model's matmuls and attention show
    assert kinds["matmul"] > 0 and kinds["attention"] > 0 and report["device"] == "cpu"
    top = report["step_top_ops"]  # and the ops that took the most, largest first, each of its kind
    assert len(top) == 15 and [op["ms"] for op in top] == sorted((op["ms"] for op in top), reverse=True)
    assert any(op["name"] == "aten::addmm" and op["kind"] == "matmul" and op["calls"] > 1 for op in top), top
    assert "three more steps, data excluded, a step by op time on the host: " in proc.stdout
    assert not (out / "checkpoints").exists()  # nothing saved
    assert not (out / "metrics.jsonl").read_text()  # no log lines, no eval: the measured steps are the table's
    return report


def test_op_kinds_name_what_the_profiler_reports():
    from fastclip.profiling import breakdown_line, op_kind

    names = {  # CUDA kernels as an H100 profile names them, CPU ops as this machine's does
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_kernel": "matmul",
        "nvjet_tst_192x192_64x4_1x2_h_bz_coopA_NNT": "matmul",
        "aten::addmm": "matmul",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64>>": "attention",
        "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel::Params)": "attention",
        "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
        "_sums_kernel": "loss", "_dlogits_kernel": "loss", "_sigmoid_tile_kernel": "loss",
        "fastclip::contrastive_lse_forward": "loss",
        "void at::native::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>": "optimizer",
        "aten::_fused_adamw_": "optimizer",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>": "layer norm",
        "void at::native::reduce_kernel<512, 1, ReduceOp<float, at::native::NormTwoOps<float>>>": "reduction",
        "void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda(at::TensorIteratorBase&)>": "copy / cast",
        "Memcpy HtoD (Pageable -> Device)": "copy / cast",
        "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)": "collective",
        "ncclDevKernel_ReduceScatter_Sum_bf16_RING_LL": "collective", "aten::topk": "other",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>": "other",
    }  # fmt: skip
    assert {name: op_kind(name) for name in names} == names
    line = breakdown_line({"matmul": 30.0, "attention": 10.0}, step_s=0.05)
    assert line == "matmul 30.0 ms (75%), attention 10.0 ms (25%), the card idle 10.0 ms of 50.0"


def test_try_string_gives_every_combination_over_the_run_config():
    text = "train.zero_stage=1,2 train.precision=bf16,fp32 optim.betas=[0.9,0.98]"
    run = ["--data.batch_size", "24", "--train.zero_stage", "2", "--train.benchmark", "4"]
    cfg = parse_args([*run, "--train.benchmark_try", text])
    tried = settings(cfg)
    assert [s.label for s in tried] == [
        "train.zero_stage=1 train.precision=bf16 optim.betas=[0.9,0.98]",
        "train.zero_stage=1 train.precision=fp32 optim.betas=[0.9,0.98]",
        "train.zero_stage=2 train.precision=bf16 optim.betas=[0.9,0.98]",
        "train.zero_stage=2 train.precision=fp32 optim.betas=[0.9,0.98]",
    ]
    assert [(s.cfg.train.zero_stage, s.cfg.train.precision) for s in tried] == [
        (1, "bf16"), (1, "fp32"), (2, "bf16"), (2, "fp32")
    ]  # fmt: skip
    assert all(s.cfg.optim.betas == (0.9, 0.98) and s.cfg.data.batch_size == 24 for s in tried)  # the run's own
    assert settings(parse_args(["--train.benchmark", "4"])) == []  # no try string: the one setting of today


@pytest.mark.parametrize(
    "tried, message",
    [
        ("train.zero_stag=1,2", "the setting 'train.zero_stag=1' is refused: unknown config field 'train.zero_stag'"),
        ("train.zero_stage=1,5", "the setting 'train.zero_stage=5' is refused: train.zero_stage: must be 0, 1, 2 or 3"),
        ("train.zero_stage=3 train.compile=none,step", "'train.zero_stage=3 train.compile=step' is refused"),
        ("train.precision=bf16,fp8", "'train.precision=fp8' is refused: train.precision: must be"),
        ("train.zero_stage", "item 'train.zero_stage': write it as section.field=value,value,..."),
        ("train.zero_stage=1,,2", "item 'train.zero_stage=1,,2': write it as"),
        ("train.zero_stage=1,1", "a value is repeated"),
        ("train.zero_stage=1 train.zero_stage=2", "train.zero_stage is tried twice"),
        ("dist.timeout_s=60,120", "dist.timeout_s cannot be tried (the world is joined once per invocation)"),
        ("train.benchmark_warmup=1,2", "train.benchmark_warmup cannot be tried"),
        ("train.tf32=true,false", "train.tf32 cannot be tried (matmul precision is process-wide"),
        (" ", "train.benchmark_try: no settings given"),
    ],
)
def test_try_string_errors_name_the_item_or_setting(tried, message):
    with pytest.raises(ConfigError) as e:
        settings(parse_args(["--train.benchmark", "4", "--train.benchmark_try", tried]))
    assert message in str(e.value)
    with pytest.raises(ConfigError, match="train.benchmark_try: needs --train.benchmark N"):
        settings(parse_args(["--train.benchmark_try", "train.zero_stage=1,2"]))


def test_command_line_trains_with_the_setting(tmp_path):
    """The command drops the benchmark options (a --config file's too), replaces the run's value of a tried field,
    and keeps every other argument as typed."""
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  benchmark: 4\n  zero_stage: 2\n")
    tried = "--train.benchmark_try=train.zero_stage=1,2 train.precision=bf16,fp32"  # the launcher's --key=value
    argv = ["--local_rank=1", "--config", str(config), "--train.zero_stage", "2", "--log.dir", "runs/a b", tried,
            "--train.benchmark_warmup", "2"]  # fmt: skip
    fastest = settings(parse_args(argv))[1]
    line = command_line(argv, fastest, nodes=2, per_node=4)
    assert line.startswith("deepspeed --hostfile HOSTFILE --num_nodes 2 --num_gpus 4 fastclip/train.py --config ")
    args = shlex.split(line)[line.split().index("fastclip/train.py") + 1 :]
    assert args.count("--train.zero_stage") == 1 and not any(a.startswith("--local") for a in args)
    cfg = parse_args(args)
    assert (cfg.train.zero_stage, cfg.train.precision, cfg.log.dir) == (1, "fp32", "runs/a b")
    assert cfg.train.benchmark == 0 and cfg.train.benchmark_try is None and cfg.train.benchmark_warmup == 3


def check_sweep(out, proc, *, ranks: int, labels: list[str], args: list[str]) -> dict:
    """A sweep's table (a row per setting, one marked fastest, the command under it) and benchmark.json."""
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    report = json.loads((out / "benchmark.json").read_text())
    assert report["world_size"] == ranks and report["rounds"] == ROUNDS and report["steps"] == 4
    assert [s["setting"] for s in report["settings"]] == labels
    for s in report["settings"]:
        assert s["global_batch"] == 16 * ranks
        for phase in ("data excluded", "data included"):
            m = s["phases"][phase]
            assert len(m["rounds_samples_per_second_per_gpu"]) == ROUNDS and m["rounds_spread"] >= 0
            assert min(m["rounds_samples_per_second_per_gpu"]) <= m["samples_per_second_per_gpu"]
            assert m["peak_memory_gb"] is None and m["step_time_median_s"] > 0  # a CPU: no peak memory
    rates = {s["setting"]: s["phases"]["data included"]["samples_per_second_per_gpu"] for s in report["settings"]}
    assert report["fastest"] == max(rates, key=rates.get)
    lines = proc.stdout.splitlines()
    rows = [line for line in lines if line[2:].split("  ")[0] in labels]
    assert len(rows) == len(labels) and [r[0] for r in rows].count("*") == 1
    assert rows[[r[0] for r in rows].index("*")][2:].startswith(report["fastest"] + " ")
    command = lines[lines.index(next(line for line in lines if line.startswith("* the fastest"))) + 1].strip()
    assert command == report["command"] and command.startswith(f"deepspeed --num_gpus {ranks} fastclip/train.py ")
    again = parse_args(shlex.split(command)[4:])  # the reproducing run: the user's own, with the fastest's values
    fastest = next(s for s in report["settings"] if s["setting"] == report["fastest"])
    assert again.train.benchmark == 0 and again.train.benchmark_try is None
    assert {key: str(getattr(again.train, key.split(".")[1])) for key in fastest["overrides"]} == fastest["overrides"]
    mine = parse_args(args)
    assert (again.data, again.model, again.log) == (mine.data, mine.model, mine.log)
    assert not (out / "checkpoints").exists()
    configs = [json.loads((out / "sweep" / f"{i:02d}" / "config.json").read_text()) for i in range(len(labels))]
    for config, s in zip(configs, report["settings"]):  # each setting's own config, beside the sweep's report
        assert {key: str(config[key.split(".")[0]][key.split(".")[1]]) for key in s["overrides"]} == s["overrides"]
    return report


def _sweep_args(world_dir, out, tried: str) -> list[str]:
    return small_run_args(world_dir, out, steps=8) + [
        "--train.benchmark", "4", "--train.benchmark_warmup", "1", "--train.benchmark_try", tried
    ]  # fmt: skip


@pytest.mark.slow
def test_sweep_on_two_ranks(world_dir, tmp_path):  # (one rank: the same code, no launcher; not run again for time)
    out = tmp_path / "sweep2"
    args = _sweep_args(world_dir, out, "train.zero_stage=1,2")
    port = free_port()
    proc = run_cli([*deepspeed_cmd(2, port), *args], cwd=ROOT, timeout=400)
    report = check_sweep(out, proc, ranks=2, labels=["train.zero_stage=1", "train.zero_stage=2"], args=args)
    assert [s["zero_stage"] for s in report["settings"]] == [1, 2] and report["world"].startswith("2 ranks")
    assert not shm_buffers(port), "DeepSpeed's shared-memory files outlived the run"


def test_sweep_refuses_a_setting_before_any_model(world_dir, tmp_path):
    args = _sweep_args(world_dir, tmp_path / "refused", "train.zero_stage=2,3 train.compile=step")
    proc = run_cli([sys.executable, str(TRAIN), *args], cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "the setting 'train.zero_stage=3 train.compile=step' is refused: train.compile step needs ZeRO-1" in (
        proc.stderr
    )
    assert "DataLoader workers" not in proc.stdout + proc.stderr  # no trainer was built
