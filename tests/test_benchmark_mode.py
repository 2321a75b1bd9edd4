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
    kinds = report["step_breakdown_ms"]  # one more step profiled: the tiny model's matmuls and attention show
    assert kinds["matmul"] > 0 and kinds["attention"] > 0 and report["device"] == "cpu"
    top = report["step_top_ops"]  # and the ops that took the most, largest first, each of its kind
    assert len(top) == 15 and [op["ms"] for op in top] == sorted((op["ms"] for op in top), reverse=True)
    assert any(op["name"] == "aten::addmm" and op["kind"] == "matmul" and op["calls"] > 1 for op in top), top
    assert "three more steps, data excluded, a step by op time on the host: " in proc.stdout
    assert not (out / "checkpoints").exists()  # nothing saved
    assert not (out / "metrics.jsonl").read_text()  # no log lines, no eval: the measured steps are the table's
    return report


def test_benchmark_mode_on_two_ranks(world_dir, tmp_path):
    out = tmp_path / "bench2"
    args = small_run_args(world_dir, out, steps=8) + ["--train.benchmark", "4", "--train.benchmark_warmup", "1"]
    proc = run_cli([*deepspeed_cmd(2, 29660), *args], cwd=ROOT, timeout=400)
    report = check_report(out, proc, ranks=2, steps=4)
    assert report["world"].startswith("2 ranks")


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
