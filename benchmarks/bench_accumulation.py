"""Contrastive accumulation: fastclip's ``train.grad_accum`` (one loss over the K micro batches of a step,
fastclip/accumulation.py) against open_clip's ``train_one_epoch`` with ``--accum-freq`` (which also keeps every
negative: it re-forwards each micro batch against the cached features of the others, computing the N x N loss K
times), on the same model, batches and sizes.

- CPU throughput: the tiny model at 64 px, micro batch 64, K=4 (contrastive batch 256), data excluded.
- CPU memory: the largest contrastive batch of a doubling ladder whose first training step (optimizer state
  included) stays within 8 GiB of peak RSS, each rung in a fresh process that is killed once it passes 8 GiB;
  the tiny model at 32 px (the model's cost per sample is not what is measured: the batch the loss and the held
  inputs allow is), micro batch 512 on both sides.
- GPU: ViT-B/32 at 224 px, contrastive batch 65,536 on one GPU by accumulation (micro batch 512 x 128): samples/s
  and peak memory, open_clip with ``--accum-freq 128`` beside it (it may run out of memory: the note says so).

Run as a script, it is one rung of the memory ladder: ``python bench_accumulation.py SIDE N MICRO SHARDS_ROOT``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from bench_data import _shards  # noqa: E402
from bench_train_step import (  # noqa: E402
    CPU_PRECISION,
    _fastclip_trainer,
    _fits,
    _fixed_batches,
    _open_clip_run,
    _paired_fixed,
)
from harness import Result, bench_time  # noqa: E402

MICRO, K = 64, 4
STEPS = {"full": 3, "quick": 1}
RSS_LIMIT = 8 * 2**30
LADDER = {"full": (4096, 8192, 16384, 32768, 65536, 131072), "quick": (256,)}  # quick: one rung a side (CI)
PROBE_MICRO = {"full": 512, "quick": 128}
PROBE_PX = 32


def _micro_batches(k: int, batch: int, size: int, tokenizer, device: str = "cpu"):
    """``k`` micro batches of random images (each made when asked for: the step holds them, not this generator)
    and one tokenized caption list shared by all."""
    from fastclip.data.batch import Batch

    captions = [f"a photo of shape number {i}" for i in range(batch)]
    texts = tokenizer(captions).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(k):
        yield Batch(images=torch.randn(batch, 3, size, size, generator=g, device=device), texts=texts)


def test_accumulation_throughput_cpu(benchmark, record, quick, single_rank):
    from fastclip.data.batch import Batch

    mode = "quick" if quick else "full"
    steps, repeats = STEPS[mode], 1 if quick else 5
    precision, open_clip_precision = CPU_PRECISION[mode]
    trainer = _fastclip_trainer(single_rank, _shards(mode), steps * (repeats + 1), ("--train.grad_accum", str(K)),
                                precision=precision)  # fmt: skip
    try:
        size, tokenizer = trainer.image.size, trainer.tokenizer
        fixed = _fixed_batches(2 * K, size, tokenizer)
        cycle = (Batch(images=img, texts=txt) for _ in range(10**6) for img, txt in fixed)
        ours, base = _paired_fixed(trainer, cycle, fixed, steps, repeats, accum_freq=K, benchmark=benchmark,
                                   precision=open_clip_precision)  # fmt: skip
    finally:
        trainer.close()
    params = {"model": "fastclip-tiny", "image_px": size, "micro_batch": MICRO, "grad_accum": K,
              "contrastive_batch": K * MICRO, "ranks": 1, "precision": precision, "device": "cpu"}  # fmt: skip
    record(Result("accumulation", f"samples/s, grad_accum {K}, data excluded", params, "samples_per_second",
                  K * MICRO * steps / ours.median_s, K * MICRO * steps / base.median_s,
                  extra={"fastclip_spread": ours.spread, "open_clip_spread": base.spread, "rounds": repeats},
                  note=f"both keep all {K * MICRO} negatives; open_clip: train_one_epoch --accum-freq {K}; "
                       "rounds alternate between the two",
                  ))  # fmt: skip


# ---------------------------------------------------------------------------------- the memory ladder (CPU)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rung(side: str, n: int, micro: int, root: Path, mode: str) -> tuple[bool, int, str]:
    """One training step at contrastive batch ``n`` in a fresh process, watched every 20 ms and killed past
    RSS_LIMIT: (fits, peak RSS in bytes, why not)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    with tempfile.TemporaryFile("w+") as log:
        cmd = [sys.executable, __file__, side, str(n), str(micro), str(root), mode]
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        peak, killed = 0, False
        while proc.poll() is None:
            peak = max(peak, _rss(proc.pid))
            if peak > RSS_LIMIT:
                proc.kill()
                killed = True
            time.sleep(0.02)
        proc.wait()
        log.seek(0)
        text = log.read()
    if killed:
        return False, peak, f"passed {RSS_LIMIT / 2**30:.0f} GiB of RSS"
    if proc.returncode != 0:
        if "can't allocate memory" in text or "OutOfMemory" in text:
            return False, peak, "out of memory"
        raise RuntimeError(f"{side} at contrastive batch {n} failed:\n{text[-3000:]}")
    return True, max(peak, json.loads(text.strip().splitlines()[-1])["peak_rss"]), ""


def _largest_within_limit(
    side: str, ladder: tuple[int, ...], micro: int, root: Path, mode: str
) -> tuple[int | None, dict]:
    """The largest rung that fits, climbing until one does not; and each rung's outcome."""
    best, seen = None, {}
    for n in ladder:
        fits, peak, why = _rung(side, n, micro, root, mode)
        seen[n] = {"peak_rss_gib": round(peak / 2**30, 2), **({"stopped": why} if why else {})}
        if not fits:
            break
        best = n
    return best, seen


def test_largest_contrastive_batch_within_8gib_cpu(benchmark, record, quick):
    from harness import bench_once

    mode = "quick" if quick else "full"
    ladder, micro, root = LADDER[mode], PROBE_MICRO[mode], _shards(mode)
    ours, ours_seen = bench_once(benchmark, lambda: _largest_within_limit("fastclip", ladder, micro, root, mode))
    theirs, theirs_seen = _largest_within_limit("open_clip", ladder, micro, root, mode)
    top = "" if ours != ladder[-1] else f"; fastclip fit the ladder's top rung ({ladder[-1]}): its limit is higher"
    params = {"model": "fastclip-tiny", "image_px": PROBE_PX, "micro_batch": micro, "rss_limit_gib": 8,
              "ladder": list(ladder), "precision": CPU_PRECISION[mode][0], "device": "cpu"}  # fmt: skip
    record(Result("accumulation", "largest contrastive batch within 8 GiB RSS", params, "contrastive_batch",
                  ours, theirs, extra={"fastclip_rungs": ours_seen, "open_clip_rungs": theirs_seen},
                  note=f"one step per rung in a fresh process; open_clip --accum-freq{top}"))  # fmt: skip
    assert ours is not None, ours_seen


def _child(side: str, n: int, micro: int, root: Path, mode: str) -> None:
    """One rung: a training step at contrastive batch ``n``; prints the process's peak RSS as JSON."""
    k, (precision, open_clip_precision) = n // micro, CPU_PRECISION[mode]
    if side == "fastclip":
        import fastclip.trainer
        from fastclip.world import join_world

        # the rung's batch may exceed the bench shards' sample count, which the trainer refuses as an epoch: the
        # step is fed random batches here, so its epoch arithmetic is set to one step of one epoch
        fastclip.trainer.total_steps = lambda *args, **kwargs: (1, 1)

        extra = ("--model.force_image_size", str(PROBE_PX), "--data.batch_size", str(micro), "--train.grad_accum",
                 str(k), "--data.loader", "torch", "--data.shuffle_buffer", "8")  # fmt: skip
        trainer = _fastclip_trainer(join_world(), root, 1, extra, precision=precision)
        trainer.train_step(_micro_batches(k, micro, trainer.image.size, trainer.tokenizer))
        trainer.meters.collect()
        trainer.close()
    else:
        from fastclip.data.tokenizer import build_tokenizer

        batches = ((b.images, b.texts) for b in _micro_batches(k, micro, PROBE_PX, build_tokenizer("fastclip-tiny")))
        _open_clip_run(batches, 1, repeats=1, batch=micro, accum_freq=k, warmup=False, image_px=PROBE_PX,
                       precision=open_clip_precision)  # fmt: skip
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"peak_rss": peak}))


# ------------------------------------------------------------------------------------------------------ GPU

GPU_MICRO, GPU_K = 512, 128


@pytest.mark.gpu
def test_contrastive_batch_65536_on_one_gpu(benchmark, record, quick, single_rank, monkeypatch):
    import fastclip.trainer

    micro, k = (GPU_MICRO, 4) if quick else (GPU_MICRO, GPU_K)
    # fed random batches, not the bench shards (2,048 samples, fewer than one global batch): one step of one epoch
    monkeypatch.setattr(fastclip.trainer, "total_steps", lambda *args, **kwargs: (1, 1))
    extra = ("--model.name", "ViT-B-32", "--data.batch_size", str(micro), "--train.grad_accum", str(k),
             "--data.loader", "torch")  # fmt: skip
    trainer = _fastclip_trainer(single_rank, _shards("quick" if quick else "full"), 2, extra)
    size, tokenizer = trainer.image.size, trainer.tokenizer
    try:
        trainer.train_step(_micro_batches(k, micro, size, tokenizer, device="cuda"))  # warm-up
        trainer.meters.collect()
        torch.cuda.reset_peak_memory_stats()
        timing = bench_time(
            benchmark,
            lambda: (trainer.train_step(_micro_batches(k, micro, size, tokenizer, "cuda")), trainer.meters.collect()),
            repeats=1,
            warmup=0,
            cuda=True,
        )
        peak = torch.cuda.max_memory_allocated()
    finally:
        trainer.close()
    params = {"model": "ViT-B-32", "image_px": size, "micro_batch": micro, "grad_accum": k,
              "contrastive_batch": micro * k, "ranks": 1, "precision": "bf16", "device": "cuda"}  # fmt: skip
    case, ours = f"samples/s/GPU, contrastive batch {micro * k}", micro * k / timing.median_s
    extra = {"fastclip_peak_memory_bytes": peak}
    # fastclip's figure kept at once: the suite's time limit may cut the baseline's attempt short
    record(Result("accumulation", case, params, "samples_per_second", ours, None, extra=extra,
                  note="open_clip not measured yet"))  # fmt: skip
    theirs, note = None, f"open_clip: train_one_epoch --accum-freq {k}"
    result: list[float] = []

    def open_clip_step() -> None:
        batches = ((b.images, b.texts) for b in _micro_batches(k, micro, size, tokenizer, device="cuda"))
        result.append(_open_clip_run(batches, 1, repeats=1, model_name="ViT-B-32", batch=micro, device="cuda",
                                     accum_freq=k, warmup=False))  # fmt: skip

    if _fits(open_clip_step):
        theirs = micro * k / result[0]
    else:
        note += f": out of memory at contrastive batch {micro * k}"
    record(Result("accumulation", case, params, "samples_per_second", ours, theirs, extra=extra,
                  note=note + "; open_clip's time includes its first step (no warm-up)"))  # fmt: skip


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
