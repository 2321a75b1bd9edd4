"""Train step, samples/s/GPU: fastclip's full step (DeepSpeed ZeRO-2 bf16 engine, fused loss, device meters)
against open_clip's own ``train_one_epoch`` (autocast bf16, AdamW, open_clip's ClipLoss) on the same model and
batch size. "data excluded" feeds both the same pre-made batches; "data included" runs each with its own
loader on the same shards (fastclip: DALI; open_clip: get_wds_dataset).

CPU: the tiny demo architecture at 64 px, one rank. GPU: ViT-B/32 and ViT-B/16 at 224 px with the largest batch
of a ladder that fastclip fits (open_clip at the same batch, or at its own largest if that does not fit), the
data-included case with fastclip's torch loader and nvJPEG decode (the bare GPU image has no DALI), with MFU
against the card's measured bf16 matmul rate.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import itertools
from pathlib import Path

import pytest
import torch

from fastclip.mfu import mfu as model_flops_utilisation
from fastclip.profiling import breakdown_line, profile_step

from bench_data import _shards
from harness import Result, bench_paired, bench_time, time_fn, time_paired

BATCH = 64
STEPS = {"full": 6, "quick": 2}  # steps per timed block; the full run takes the median of 3 blocks
# the CPU step cases' precision, fastclip's train.precision and open_clip's --precision: bf16 in the full run, the
# figures' precision on any CPU; fp32 in the quick run (CI), which checks that the suites work and keeps no figure:
# torch emulates bf16 matmuls on a CPU without AVX-512, 26x slower than fp32, and the quick run took 16 minutes so
CPU_PRECISION = {"full": ("bf16", "amp_bf16"), "quick": ("fp32", "fp32")}
# (model, batch ladder searched for the largest that fits, train FLOPs per sample)
GPU_CASES = [("ViT-B-32", (256, 512, 1024, 1536, 2048), 44.3e9), ("ViT-B-16", (128, 256, 384, 512, 768), 123.3e9)]


def _fixed_batches(n: int, size: int, tokenizer, batch: int = BATCH, device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    captions = [
        f"a photo of a {c} shape number {i}" for i, c in enumerate(["red", "green", "blue", "white"] * (batch // 4))
    ]
    return [
        (torch.randn(batch, 3, size, size, generator=g).to(device), tokenizer(captions).to(device)) for _ in range(n)
    ]


class _Take:
    """What train_one_epoch needs of a dataloader (iteration, num_batches, num_samples): the next ``n`` batches
    of one shared iterator, so that the timed epochs continue the warm-up's pipeline instead of restarting it
    (restarting would charge open_clip a shuffle-buffer refill that fastclip's timing does not pay)."""

    def __init__(self, batches, n: int, batch: int):
        self.batches, self.num_batches, self.num_samples = batches, n, n * batch

    def __iter__(self):
        for _ in range(self.num_batches):
            yield next(self.batches)


class OpenClipTrainer:
    """open_clip_train.train.train_one_epoch on one device: the model, AdamW, the cosine schedule and ClipLoss as
    open_clip's main sets them up; :meth:`epoch` runs ``n`` optimizer steps (each of ``accum_freq`` micro batches
    of ``batch``) drawn from one iterator, ``batches``, that every epoch continues."""

    def __init__(self, batches, *, model_name: str = "fastclip-tiny", batch: int = BATCH, device="cpu",
                 accum_freq: int = 1, image_px: int | None = None, compile_backend: str | None = None,
                 precision: str = "amp_bf16"):  # fmt: skip
        import open_clip
        from open_clip_train.params import parse_args
        from open_clip_train.scheduler import cosine_lr

        from fastclip.model import param_groups, resolve_model_name

        self.args = args = parse_args(
            ["--model", model_name, "--precision", precision, "--batch-size", str(batch), "--lr", "1e-3",
             "--wd", "0.1", "--grad-clip-norm", "1.0", "--log-every-n-steps", "1000", "--train-data", "unused",
             "--accum-freq", str(accum_freq)]
        )  # fmt: skip
        args.device, args.world_size, args.rank, args.local_rank, args.distributed = device, 1, 0, 0, False
        # set by open_clip_train.main, which this bypasses
        args.distill, args.wandb, args.tensorboard, args.save_logs = False, False, False, False
        torch.manual_seed(0)
        name = resolve_model_name(model_name)
        self.model = open_clip.create_model(name, output_dict=True, force_image_size=image_px).to(device)
        if compile_backend:  # open_clip's --torchcompile: torch.compile(model), here with the given backend
            self.model = torch.compile(self.model, backend=compile_backend)
        # open_clip_train.main's two groups (tests/test_param_layout.py holds fastclip's 'open_clip' rule to its
        # lambda); per-tensor AdamW has no flat buffer to align
        groups = param_groups(self.model, weight_decay=0.1, rule="open_clip", align=False)
        self.optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
        self.scheduler = cosine_lr(self.optimizer, 1e-3, 10, 10_000)
        self.loss = open_clip.ClipLoss()
        self.batches, self.batch, self.accum_freq, self.device, self.epochs = batches, batch, accum_freq, device, 0

    def epoch(self, n: int) -> None:
        from open_clip_train.data import DataInfo
        from open_clip_train.train import train_one_epoch

        data = {"train": DataInfo(dataloader=_Take(self.batches, n * self.accum_freq, self.batch))}
        train_one_epoch(self.model, data, self.loss, self.epochs, self.optimizer, None, self.scheduler, None, self.args)
        self.epochs += 1
        _sync(self.device)


def _open_clip_run(batches, steps: int, *, repeats: int, warmup: bool = True, profile: dict | None = None,
                   **kwargs) -> float:  # fmt: skip
    """Median over ``repeats`` epochs of ``steps`` of open_clip's seconds per optimizer step, after a one-step
    warm-up epoch (see :class:`OpenClipTrainer` for ``kwargs``); with ``profile``, one more step profiled into it
    (:func:`_profile_into`)."""
    runner = OpenClipTrainer(batches, **kwargs)
    if warmup:
        runner.epoch(1)
    per_step = time_fn(lambda: runner.epoch(steps), repeats=repeats, warmup=0).median_s / steps
    if profile is not None:
        _profile_into(profile, lambda: runner.epoch(1), cuda=str(runner.device).startswith("cuda"))
    return per_step


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _fastclip_trainer(world, root, steps: int, extra: tuple = (), precision: str = "bf16"):
    from fastclip.cli import parse_args
    from fastclip.trainer import Trainer

    cfg = parse_args(
        ["--data.train_shards", str(root / "train" / "*.tar"), "--data.batch_size", str(BATCH),
         "--data.shuffle_buffer", "256", "--train.steps", str(steps + 2), "--log.progress", "false",
         "--train.precision", precision,  # bf16 unless asked: the figures' precision on any CPU (not auto's)
         "--log.dir", str(root / "runs"), "--checkpoint.dir", str(root / "runs" / "ckpt"), *extra]
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, every=10_000))
    return Trainer(cfg, world)


def _fastclip_run(trainer, batches, steps: int, *, repeats: int, timer=time_fn) -> float:
    """Median over ``repeats`` blocks of ``steps`` of fastclip's seconds per step, after one warm-up step."""

    def block() -> None:
        for _ in range(steps):
            trainer.train_step(batches)
        trainer.meters.collect()  # the numbers reach the host once, as at a log step (and the device drains)

    trainer.train_step(batches)  # warm-up
    trainer.meters.collect()
    return timer(block, repeats=repeats, warmup=0).median_s / steps


def _profile_into(into: dict, fn, *, cuda: bool) -> None:
    """``fn`` profiled (:func:`fastclip.profiling.profile_step`; a GPU step once, a CPU step, noisier, thrice):
    ``into["kinds"]``, ms a call by kind of work, and ``into["top"]``, the ops or kernels that took the most;
    ``into["error"]`` if the profiler failed."""
    try:
        profiled = profile_step(fn, cuda=cuda, repeat=1 if cuda else 3)
        into.update(kinds=profiled.kinds, top=profiled.top)
    except Exception as e:  # a profiler that cannot start (CUPTI, say) must not cost the timed figures
        into["error"] = f"{type(e).__name__}: {e}"[:300]


def _kinds_result(params: dict, ours: dict, theirs: dict, step_s: tuple[float | None, float | None]) -> Result:
    """Where one step's time goes (:func:`_profile_into`'s profiles), fastclip beside open_clip (``theirs`` empty:
    fastclip's alone): the kinds that differ most in the note, each side's most costly ops or kernels in the
    extra, and, on a GPU, how long the card idled in a step (the timed step, ``step_s``, less its kernels' time)."""
    case = "step time by kind (kernel or op time)"
    failed = [f"{who}'s profile failed: {p['error']}" for who, p in (("fastclip", ours), ("open_clip", theirs))
              if "error" in p]  # fmt: skip
    if failed:
        return Result("train_step", case, params, "seconds", None, None, note="; ".join(failed))
    mine, base = ours["kinds"], theirs.get("kinds", {})
    busy = (sum(mine.values()) / 1e3, sum(base.values()) / 1e3 if base else None)
    extra: dict = {"fastclip_ms": mine, "open_clip_ms": base,
                   "fastclip_top_ops": ours["top"], "open_clip_top_ops": theirs.get("top", [])}  # fmt: skip
    if base:
        diffs = sorted(mine.keys() | base.keys(), key=lambda k: -abs(mine.get(k, 0.0) - base.get(k, 0.0)))
        note = "ms a step, fastclip - open_clip: " + ", ".join(
            f"{k} {mine.get(k, 0.0) - base.get(k, 0.0):+.1f}" for k in diffs[:5]
        )
    else:
        note = "fastclip alone (open_clip not measured at this batch): " + breakdown_line(mine)
    if params.get("device") == "cuda":
        idle = [1e3 * (step - b) if step and b is not None else None for step, b in zip(step_s, busy)]
        extra.update(fastclip_idle_ms=idle[0], open_clip_idle_ms=idle[1])
        note += "; the card idle a step: " + ", ".join(
            f"{who} {ms:.1f} ms" for who, ms in zip(("fastclip", "open_clip"), idle) if ms is not None
        )
    return Result("train_step", case, params, "seconds", busy[0], busy[1], extra=extra, note=note)


def test_train_step_cpu(benchmark, record, quick, single_rank):
    from fastclip.data.batch import Batch

    mode = "quick" if quick else "full"
    steps, repeats = STEPS[mode], 1 if quick else 5
    root, (precision, open_clip_precision) = _shards(mode), CPU_PRECISION[mode]
    trainer = _fastclip_trainer(single_rank, root, steps * (2 * repeats + 2), precision=precision)
    try:
        size = trainer.image.size
        fixed = _fixed_batches(steps + 1, size, trainer.tokenizer)
        cycle = (Batch(images=img, texts=txt) for _ in range(10**6) for img, txt in fixed)
        profiles: dict = {}
        paired = _paired_fixed(trainer, cycle, fixed, steps, repeats, profiles=profiles, precision=open_clip_precision)
        ours_fixed, theirs_fixed = (t.median_s / steps for t in paired)
        timer = functools.partial(bench_time, benchmark)  # the figure users compare: data included
        # one loader at a time: a second one's workers would prefetch in the background of the other's rounds
        ours_loaded = _fastclip_run(trainer, iter(trainer.train_loader), steps, repeats=repeats, timer=timer)
    finally:
        trainer.close()
    theirs_loaded = _open_clip_run(
        iter(_open_clip_loader_for(root, size)), steps, repeats=repeats, precision=open_clip_precision
    )
    params = {
        "model": "fastclip-tiny",
        "image_px": size,
        "batch": BATCH,
        "ranks": 1,
        "precision": precision,
        "device": "cpu",
    }
    for case, ours, theirs in (
        ("data excluded", ours_fixed, theirs_fixed),
        ("data included", ours_loaded, theirs_loaded),
    ):
        record(Result("train_step", f"samples/s/GPU, {case}", params, "samples_per_second",
                      BATCH / ours, BATCH / theirs,
                      note=f"open_clip: train_one_epoch, --precision {open_clip_precision}"))  # fmt: skip
    record(_kinds_result(params, profiles["fastclip"], profiles["open_clip"], (ours_fixed, theirs_fixed)))
    benchmark.extra_info.update(params=params)


NARROW_B32 = Path(__file__).parent / "model_configs" / "ViT-B-32-narrow.json"


def test_host_time_cpu(benchmark, record, quick, single_rank):
    """The host's share of a step: ViT-B/32's structure (12 + 12 blocks: its 302 parameter tensors, its ops, its
    optimizer bookkeeping) at width 64, 64 px, a 1,024-token vocabulary (1.5M parameters in all) and batch 4, where
    the arithmetic is small and a step's time is mostly what Python, the dispatcher and the optimizer's loops cost
    the host. On a GPU that is the floor under a step: at small per-GPU batches the card waits on it. fastclip's
    whole step (DeepSpeed's engine and ZeRO-2 hooks, device meters) against open_clip's train_one_epoch, same
    batches, alternating rounds."""
    from fastclip.data.batch import Batch

    steps, repeats, batch = (5, 3, 4) if quick else (20, 7, 4)
    extra = ("--model.name", str(NARROW_B32), "--data.batch_size", str(batch))
    trainer = _fastclip_trainer(single_rank, _shards("quick" if quick else "full"), steps * (repeats + 2), extra)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a GPU's host runs a step: one thread launching; no intra-op pool in the figure
    try:
        vocab = trainer.engine.module.vocab_size  # the tokenizer's ids taken into it: their values cost nothing
        fixed = [
            (img, txt % vocab) for img, txt in _fixed_batches(2, trainer.image.size, trainer.tokenizer, batch=batch)
        ]
        cycle = (Batch(images=img, texts=txt) for _ in range(10**6) for img, txt in fixed)
        paired = _paired_fixed(trainer, cycle, fixed, steps, repeats, benchmark=benchmark,
                               model_name=str(NARROW_B32), batch=batch)  # fmt: skip
    finally:
        torch.set_num_threads(threads)
        trainer.close()
    ours, theirs = (t.median_s / steps for t in paired)
    params = {"model": "ViT-B-32 structure, width 64, vocab 1024", "image_px": trainer.image.size, "batch": batch,
              "ranks": 1,
              "precision": "bf16", "device": "cpu", "threads": 1}  # fmt: skip
    note = "open_clip: train_one_epoch, autocast bf16; the floor of a GPU step at small batches"
    record(Result("train_step", "host time a step (little arithmetic)", params, "seconds", ours, theirs, note=note))
    benchmark.extra_info.update(params=params)


def _saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for the backward while ``fn(*args)`` runs (weights included)."""
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(kept.values())


def test_saved_for_backward_cpu(record, quick, single_rank):
    """Activation memory, the bulk of a GPU step's peak at large batches: the bytes autograd keeps for the backward,
    per sample (the slope between two batch sizes, so the weights and their casts drop out), of fastclip's forward
    and loss (bf16 weights, the fused loss) and open_clip's (fp32 weights under autocast bf16, ClipLoss). Counted,
    not timed: the same tensors are kept on a GPU, where attention keeps its log-sum-exp alike."""
    import open_clip

    from fastclip.data.batch import Batch
    from fastclip.model import resolve_model_name

    model, sizes = ("fastclip-tiny", (4, 8)) if quick else ("ViT-B-32", (4, 8))
    trainer = _fastclip_trainer(single_rank, _shards("quick" if quick else "full"), 2, ("--model.name", model))
    try:
        size, tokenizer = trainer.image.size, trainer.tokenizer
        batches = {b: _fixed_batches(1, size, tokenizer, batch=b)[0] for b in sizes}
        ours = [_saved_bytes(trainer.forward_and_loss, Batch(images=i, texts=t)) for i, t in batches.values()]
    finally:
        trainer.close()
    clip, loss = open_clip.create_model(resolve_model_name(model), output_dict=True), open_clip.ClipLoss()

    def theirs_forward(images, texts) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = clip(images, texts)
            loss(out["image_features"], out["text_features"], out["logit_scale"].exp())

    theirs = [_saved_bytes(theirs_forward, i, t) for i, t in batches.values()]
    per_sample = [(hi - lo) / (sizes[1] - sizes[0]) for lo, hi in (ours, theirs)]
    params = {"model": model, "image_px": size, "batches": list(sizes), "precision": "bf16", "device": "cpu"}
    note = "bytes kept for the backward per sample; open_clip: autocast bf16 over fp32 weights, ClipLoss"
    record(Result("train_step", "saved for backward per sample", params, "bytes", *per_sample, note=note))


def test_compile_cpu(benchmark, record, quick, single_rank):
    """Eager vs train.compile model vs train.compile step, and open_clip's train_one_epoch eager vs --torchcompile,
    on the same pre-made batches (data excluded), with inductor, the default backend. Full mode only: a quick run
    would time nothing, and tests/test_compile.py drives train.compile through the trainer in CI."""
    from fastclip.data.batch import Batch

    if quick:
        pytest.skip("full mode only: compile times are what this measures")
    backend, steps, repeats = "inductor", STEPS["full"], 3
    root = _shards("full")
    rates = {}
    for mode in ("none", "model", "step"):
        torch._dynamo.reset()
        extra = ("--train.compile", mode, "--train.compile_backend", backend)
        trainer = _fastclip_trainer(single_rank, root, steps * (repeats + 2), extra)
        try:
            fixed = _fixed_batches(2, trainer.image.size, trainer.tokenizer)
            cycle = (Batch(images=img, texts=txt) for _ in range(10**6) for img, txt in fixed)
            timer = functools.partial(bench_time, benchmark) if mode == "step" else time_fn
            rates[mode] = BATCH / _fastclip_run(trainer, cycle, steps, repeats=repeats, timer=timer)
        finally:
            trainer.close()
        size, tokenizer = trainer.image.size, trainer.tokenizer
    for compiled in (False, True):
        torch._dynamo.reset()
        batches = itertools.cycle(_fixed_batches(2, size, tokenizer))
        per_step = _open_clip_run(batches, steps, repeats=repeats, compile_backend=backend if compiled else None)
        rates[f"open_clip {'compiled' if compiled else 'eager'}"] = BATCH / per_step
    params = {"model": "fastclip-tiny", "image_px": size, "batch": BATCH, "ranks": 1, "precision": "bf16",
              "device": "cpu", "backend": backend}  # fmt: skip
    for mode, base in (("none", "open_clip eager"), ("model", "open_clip compiled"), ("step", "open_clip compiled")):
        record(Result("train_step", f"samples/s/GPU, data excluded, compile {mode}", params, "samples_per_second",
                      rates[mode], rates[base], extra={"eager_samples_per_second": rates["none"]},
                      note=f"open_clip: train_one_epoch{' --torchcompile' if 'compiled' in base else ''}"))  # fmt: skip
    benchmark.extra_info.update(params=params, rates=rates)


def _paired_fixed(trainer, cycle, fixed, steps: int, repeats: int, *, accum_freq: int = 1, benchmark=None,
                  profiles: dict | None = None, **open_clip):  # fmt: skip
    """Seconds per step of fastclip (``trainer`` on ``cycle``) and open_clip (``train_one_epoch`` with
    ``accum_freq``; ``open_clip``: more of :class:`OpenClipTrainer`'s arguments) on the same pre-made batches, in
    alternating rounds after a warm-up step each: no loader runs, so neither side's rounds share the machine with
    the other's work. With ``benchmark``, fastclip's rounds are pytest-benchmark's. With ``profiles``, one more step
    of each profiled into profiles["fastclip"], ["open_clip"]."""
    theirs = OpenClipTrainer(itertools.cycle(fixed), accum_freq=accum_freq, **open_clip)
    theirs.epoch(1)
    trainer.train_step(cycle)
    trainer.meters.collect()

    def ours_block() -> None:
        for _ in range(steps):
            trainer.train_step(cycle)
        trainer.meters.collect()  # the numbers reach the host once, as at a log step

    if benchmark is None:
        ours, base = time_paired(ours_block, lambda: theirs.epoch(steps), repeats=repeats)
    else:
        ours, base = bench_paired(benchmark, ours_block, lambda: theirs.epoch(steps), repeats=repeats)
    if profiles is not None:
        _profile_into(profiles.setdefault("fastclip", {}), lambda: trainer.train_step(cycle), cuda=False)
        _profile_into(profiles.setdefault("open_clip", {}), lambda: theirs.epoch(1), cuda=False)
    return ours, base


def _open_clip_loader_for(root, size: int):
    """open_clip's own webdataset loader, transforms for ``size`` px (the tiny model's input)."""
    import open_clip
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args

    from fastclip.model import resolve_model_name

    shards = sorted(str(p) for p in (root / "train").glob("*.tar"))
    n = 64 * BATCH
    args = parse_args(
        ["--train-data", "::".join(shards), "--train-num-samples", str(n), "--dataset-type", "webdataset",
         "--batch-size", str(BATCH), "--workers", "2", "--model", "fastclip-tiny"]
    )  # fmt: skip
    args.world_size, args.rank, args.distributed = 1, 0, False
    name = resolve_model_name("fastclip-tiny")
    _, preprocess_train, _ = open_clip.create_model_and_transforms(name)
    return get_wds_dataset(args, preprocess_train, is_train=True, tokenizer=open_clip.get_tokenizer(name)).dataloader


def _out_of_memory(e: BaseException) -> bool:
    """CUDA out of memory as torch raises it, or as a RuntimeError from cuBLAS, cuDNN or NCCL allocations."""
    text = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "alloc_failed" in text


def _release_cuda() -> None:
    """What earlier runs left on the card (collected objects, the allocator's cache) back to the driver."""
    gc.collect()
    torch.cuda.empty_cache()


def _memory_mark() -> int:
    """Bytes allocated now, the peak counter restarted: ``max_memory_allocated() - mark`` is what follows' peak."""
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _fits(fn) -> bool:
    """Whether ``fn`` runs without exhausting GPU memory (what it allocated is freed either way)."""
    try:
        fn()
        return True
    except RuntimeError as e:  # torch.OutOfMemoryError is one
        if not _out_of_memory(e):
            raise
        return False
    finally:
        _release_cuda()


def _largest(ladder: tuple[int, ...], fits) -> int | None:
    """The largest batch of the ascending ``ladder`` that ``fits``, tried from the top down: on a card that holds
    the largest, one probe instead of one per rung (device time is the suite's scarcest resource)."""
    for batch in reversed(ladder):
        if fits(batch):
            return batch
    return None


def _fastclip_largest(trainer_at, ladder: tuple[int, ...]) -> tuple[int | None, int, object]:
    """The largest batch of ``ladder`` that fastclip's step fits, found on a probe engine (DeepSpeed's state after an
    out-of-memory step is not trusted, so the measured engine is a fresh one); also the image size and tokenizer."""
    from fastclip.data.batch import Batch

    probe = trainer_at(ladder[0])
    size, tokenizer = probe.image.size, probe.tokenizer

    def step(b: int) -> None:
        images, texts = _fixed_batches(1, size, tokenizer, batch=b, device="cuda")[0]
        probe.train_step(iter([Batch(images=images, texts=texts)]))
        torch.cuda.synchronize()

    try:
        return _largest(ladder, lambda b: _fits(lambda: step(b))), size, tokenizer
    finally:
        probe.close()  # its engine is freed at the next collection (_fastclip_measured starts with one)


@pytest.mark.gpu
@pytest.mark.parametrize("model_name, ladder, flops_per_sample", GPU_CASES)
def test_train_step_gpu(benchmark, record, quick, single_rank, model_name, ladder, flops_per_sample):
    from bench_loss import _bf16_matmul_peak

    steps, repeats = (3, 1) if quick else (5, 3)
    ladder = ladder[:2] if quick else ladder
    root = _shards("quick" if quick else "full")

    def trainer_at(batch: int):
        extra = ("--model.name", model_name, "--data.batch_size", str(batch), "--data.loader", "torch",
                 "--data.num_threads", "8")  # fmt: skip
        return _fastclip_trainer(single_rank, root, steps, extra)

    batch, size, tokenizer = _fastclip_largest(trainer_at, ladder)
    params = {"model": model_name, "image_px": size, "ranks": 1, "precision": "bf16", "device": "cuda"}
    if batch is None:
        note = f"fastclip ran out of memory at batch {ladder[0]}"
        params["batch"] = ladder[0]
        record(
            Result("train_step", "samples/s/GPU, data excluded", params, "samples_per_second", None, None, note=note)
        )
        pytest.skip("no batch of the ladder fits")
    ours = _fastclip_measured(trainer_at, batch, steps, repeats, benchmark)
    figures = dict(params={**params, "batch": batch}, batch=batch, ladder=ladder, per_sample=flops_per_sample,
                   peak=_bf16_matmul_peak())  # fmt: skip
    for result in _gpu_results(ours, {}, **figures):  # kept at once: the suite's limit may cut what follows
        record(result)
    theirs = _open_clip_measured(model_name, size, tokenizer, batch, ladder, steps, repeats)
    for result in _gpu_results(ours, theirs, **figures):
        record(result)


def _gpu_results(ours: dict, theirs: dict, *, params, batch, ladder, per_sample, peak) -> list[Result]:
    """The figures of a GPU train-step case from what is measured so far (``theirs`` empty: open_clip not yet)."""
    same = theirs.get("batch") == batch
    if not theirs:
        base_note = "; open_clip not measured yet"
    else:
        base_note = "" if same else (f"; open_clip at batch {theirs['batch']}, its largest that fits"
                                     if theirs["batch"] else "; open_clip: no batch fits")  # fmt: skip
    results = []
    for case, seconds, base in (("data excluded", ours["fixed_s"], theirs.get("per_sample_s")),
                                ("data included", ours.get("loaded_s"), None)):  # fmt: skip
        if seconds is None:
            results.append(Result("train_step", f"samples/s/GPU, {case}", params, "samples_per_second", None, None,
                                  note=f"fastclip's loader failed: {ours.get('loaded_error')}"))  # fmt: skip
            continue
        mfu = model_flops_utilisation(batch / seconds, per_sample, peak)
        note = f"largest batch of {list(ladder)} that fits; MFU {mfu:.0%} of the bf16 matmul rate" + (
            base_note if case == "data excluded" else "; open_clip's loader not run on the GPU image"
        )
        extra = {"fastclip_mfu": mfu, "matmul_peak_flops": peak, "baseline_batch": theirs.get("batch"),
                 "fastclip_peak_memory_bytes": ours["peak_bytes"], "ladder": list(ladder)}  # fmt: skip
        results.append(Result("train_step", f"samples/s/GPU, {case}", params, "samples_per_second", batch / seconds,
                              1 / base if base else None, extra=extra, note=note))  # fmt: skip
    memory_note = "torch.cuda.max_memory_allocated over the model's build and the timed steps" + base_note
    results.append(Result("train_step", "peak memory, data excluded", params, "bytes", ours["peak_bytes"],
                          theirs.get("peak_bytes") if same else None, note=memory_note))  # fmt: skip
    their_step = theirs["per_sample_s"] * batch if same and "per_sample_s" in theirs else None
    results.append(_kinds_result(params, ours["profile"], theirs.get("profile", {}) if same else {},
                                 (ours["fixed_s"], their_step)))  # fmt: skip
    return results


def _fastclip_measured(trainer_at, batch: int, steps: int, repeats: int, benchmark) -> dict:
    """fastclip's seconds per step at ``batch`` on pre-made CUDA batches (data excluded) and from its loader, the
    peak memory of its build and steps, then one profiled step's time by kind (profiled last: a profiler session
    may slow what follows it in the process)."""
    from fastclip.data.batch import Batch

    _release_cuda()
    before = _memory_mark()
    trainer = trainer_at(batch)  # after ``before``: the engine's weights and optimizer state count, as open_clip's do
    out: dict = {"profile": {}}
    try:
        fixed = _fixed_batches(2, trainer.image.size, trainer.tokenizer, batch=batch, device="cuda")
        cycle = (Batch(images=img, texts=txt) for _ in range(10**6) for img, txt in fixed)
        timer = functools.partial(bench_time, benchmark, cuda=True)
        out["fixed_s"] = _fastclip_run(trainer, cycle, steps, repeats=repeats, timer=timer)
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - before
        try:
            out["loaded_s"] = _fastclip_run(trainer, iter(trainer.train_loader), steps, repeats=repeats)
        except Exception as e:  # the data path is another subsystem: its failure must not cost the step's figures
            out["loaded_error"] = f"{type(e).__name__}: {e}"[:300]
        _profile_into(out["profile"], lambda: trainer.train_step(cycle), cuda=True)
    finally:
        trainer.close()
    return out


def _open_clip_measured(model_name: str, size: int, tokenizer, batch: int, ladder, steps: int, repeats: int) -> dict:
    """open_clip's train_one_epoch at ``batch``, or at the largest smaller batch of ``ladder`` that fits: that batch,
    seconds per sample, peak memory added and one profiled step's time by kind (``batch`` None: none fits)."""
    _release_cuda()

    def at(b: int, steps: int, repeats: int, profile: dict | None = None) -> float:
        batches = itertools.cycle(_fixed_batches(2, size, tokenizer, batch=b, device="cuda"))
        return _open_clip_run(batches, steps, repeats=repeats, model_name=model_name, batch=b, device="cuda",
                              profile=profile)  # fmt: skip

    chosen = batch
    if not _fits(lambda: at(batch, 1, 1)):
        chosen = _largest(tuple(b for b in ladder if b < batch), lambda b: _fits(lambda: at(b, 1, 1)))
    out: dict = {"batch": chosen, "profile": {}}
    if chosen is not None:
        before = _memory_mark()
        out["per_sample_s"] = at(chosen, steps, repeats, out["profile"]) / chosen
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("model_name, ladder, flops_per_sample", GPU_CASES[:1])
def test_compile_gpu(benchmark, record, quick, single_rank, model_name, ladder, flops_per_sample):
    """ViT-B/32 at one batch (1024; 256 quick), data excluded: fastclip eager, train.compile model and step
    (inductor), against open_clip's train_one_epoch eager and --torchcompile, each figure kept as measured."""
    from fastclip.data.batch import Batch

    from bench_loss import _bf16_matmul_peak

    steps, repeats, batch = (3, 1, 256) if quick else (5, 3, 1024)
    root = _shards("quick" if quick else "full")
    peak = _bf16_matmul_peak()
    params = {"model": model_name, "batch": batch, "ranks": 1, "precision": "bf16", "device": "cuda"}
    rates: dict[str, float] = {}
    for mode in ("none", "model", "step"):
        torch._dynamo.reset()
        extra = ("--model.name", model_name, "--data.batch_size", str(batch), "--data.loader", "torch",
                 "--train.compile", mode, "--data.val_shards", "null")  # fmt: skip
        trainer = _fastclip_trainer(single_rank, root, steps, extra)
        try:
            size, tokenizer = trainer.image.size, trainer.tokenizer
            fixed = _fixed_batches(2, size, tokenizer, batch=batch, device="cuda")
            cycle = (Batch(images=img, texts=txt) for _ in range(10**6) for img, txt in fixed)
            timer = functools.partial(bench_time, benchmark) if mode == "step" else time_fn
            rates[mode] = batch / _fastclip_run(trainer, cycle, steps, repeats=repeats,
                                                timer=functools.partial(timer, cuda=True))  # fmt: skip
        finally:
            trainer.close()
        mfu = model_flops_utilisation(rates[mode], flops_per_sample, peak)
        record(Result("train_step", f"samples/s/GPU, data excluded, compile {mode}", params, "samples_per_second",
                      rates[mode], None, extra={"fastclip_mfu": mfu, "eager": rates["none"]},
                      note=f"MFU {mfu:.0%}; open_clip not measured yet"))  # fmt: skip
    for compiled in (False, True):
        torch._dynamo.reset()
        batches = itertools.cycle(_fixed_batches(2, size, tokenizer, batch=batch, device="cuda"))
        per_step = _open_clip_run(batches, steps, repeats=repeats, model_name=model_name, batch=batch,
                                  device="cuda", compile_backend="inductor" if compiled else None)  # fmt: skip
        rates[f"open_clip {compiled}"] = batch / per_step
    for mode in ("none", "model", "step"):
        mfu = model_flops_utilisation(rates[mode], flops_per_sample, peak)
        base = rates[f"open_clip {mode != 'none'}"]
        flag = " --torchcompile" if mode != "none" else ""
        record(Result("train_step", f"samples/s/GPU, data excluded, compile {mode}", params, "samples_per_second",
                      rates[mode], base, extra={"fastclip_mfu": mfu, "eager": rates["none"]},
                      note=f"MFU {mfu:.0%}; open_clip: train_one_epoch{flag}"))  # fmt: skip


@pytest.mark.gpu
def test_zero_stages_gpu(benchmark, record, quick, single_rank):
    """ViT-B/16 on one card at one batch: samples/s of ZeRO-2 and ZeRO-3 against ZeRO-1 (data excluded). On one
    rank nothing is partitioned, so this measures what each stage's machinery costs a step: ZeRO-3's parameter
    fetches and its host syncs (fastclip/zero.py), ZeRO-2's gradient buckets."""
    from fastclip.data.batch import Batch

    steps, repeats, batch = (3, 1, 128) if quick else (5, 3, 256)
    root = _shards("quick" if quick else "full")
    per_sample = {}
    for stage in (1, 2, 3):
        extra = ("--model.name", "ViT-B-16", "--data.batch_size", str(batch), "--data.loader", "torch",
                 "--train.zero_stage", str(stage), "--data.val_shards", "null")  # fmt: skip
        trainer = _fastclip_trainer(single_rank, root, steps, extra)
        try:
            fixed = _fixed_batches(2, trainer.image.size, trainer.tokenizer, batch=batch, device="cuda")
            cycle = (Batch(images=img, texts=txt) for _ in range(10**6) for img, txt in fixed)
            timer = functools.partial(bench_time, benchmark) if stage == 3 else time_fn  # the fixture times once
            timer = functools.partial(timer, cuda=True)
            per_sample[stage] = _fastclip_run(trainer, cycle, steps, repeats=repeats, timer=timer) / batch
        finally:
            trainer.close()
        params = {"model": "ViT-B-16", "batch": batch, "ranks": 1, "precision": "bf16", "device": "cuda",
                  "stage": stage}  # fmt: skip
        if stage > 1:  # each figure recorded as soon as it exists
            record(Result("train_step", f"ZeRO-{stage} vs ZeRO-1, samples/s, one GPU", params, "samples_per_second",
                          1 / per_sample[stage], 1 / per_sample[1]))  # fmt: skip
