"""Step parity with open_clip: what one ViT-B/32 training step costs fastclip under each setting that could explain
the first GPU run's gap (0.66x open_clip on an H200 at batch 2,048, data excluded), beside open_clip's own
``train_one_epoch`` on the same card, batch and pre-made batches, in one process, rounds alternating.

- alignment kernels: a bf16 Linear at ViT-B/32's MLP shape and a LayerNorm at its width, forward and backward,
  with the bias (and the norm's weight) 16-byte aligned against 2 bytes off, as DeepSpeed's flat groups held 201 of
  ViT-B/32's 302 parameters before the aligned layout (fastclip/model.py's param_group_names): the time of each and
  the kernels the card chose (torch.profiler). The baseline column here is the misaligned layout, not open_clip.
- step parity: fastclip as landed before the aligned layout (``train.align_params false``, the old decay rule), the
  aligned default, ZeRO-1, ``amp_bf16`` and, at the large batch (2,048 on an H200, 1,024 on an 80 GB card, where
  five resident trainers and 2,048's activations would not fit), ``train.compile step``, each against open_clip:
  samples/s/GPU, MFU, each side's own peak memory, where a step's time goes and how long the card idled; then the
  default's data-included rate with the automatic worker count, against its own data-excluded rate.

Every side's trainer is built once and kept; each round measures every side once, every other round reversed, so
drift reaches all alike; each figure is recorded as soon as it exists (a suite cut by its limit keeps them).
On a CPU (the quick run, CI): fastclip-tiny at batch 16 (8 quick), which keeps the code a GPU lease runs honest;
the figures say little.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from fastclip.benchmark import fresh_stream
from fastclip.profiling import profile_step

from bench_data import ROOT, _shards
from bench_train_step import (
    GPU_CASES,
    OpenClipTrainer,
    _fastclip_run,
    _fastclip_trainer,
    _fixed_batches,
    _kinds_result,
    _out_of_memory,
    _profile_into,
    _release_cuda,
)
from harness import Result, time_fn, time_paired

# (tokens, width, MLP width): ViT-B/32 at 224 px is 50 tokens a sample (49 patches and the class token)
MLP_SHAPES = {"gpu": (2048 * 50, 768, 3072), "cpu": (16 * 50, 64, 256)}
OLD_LAYOUT = ("--train.align_params", "false", "--optim.decay_rule", "no_embeddings")
DEFAULT = "aligned bf16 ZeRO-2 (default)"
# label: fastclip's options over the benchmark trainer's (ZeRO-2, bf16, no compile)
EAGER = {
    "before: unaligned, old decay rule": OLD_LAYOUT,
    DEFAULT: (),
    "aligned bf16 ZeRO-1": ("--train.zero_stage", "1"),
    "aligned amp_bf16 ZeRO-2": ("--train.precision", "amp_bf16"),
}
COMPILED = {DEFAULT: (), "aligned bf16 ZeRO-2 compile step": ("--train.compile", "step")}
OPEN_CLIP = "open_clip train_one_epoch (amp_bf16)"


def _misplaced(values: torch.Tensor, offset: int) -> torch.nn.Parameter:
    """A parameter holding ``values`` that starts ``offset`` elements into a buffer of its own, as DeepSpeed makes
    every parameter a view of its group's flat buffer (its gradient is autograd's, freshly allocated, as there)."""
    buffer = torch.empty(values.numel() + offset, dtype=values.dtype, device=values.device)
    p = torch.nn.Parameter(torch.empty(0, dtype=values.dtype, device=values.device))
    p.data = buffer.narrow(0, offset, values.numel()).view_as(values).copy_(values)
    return p


def _layer_steps(shape: tuple[int, int, int], device: str, offset: int) -> dict[str, Callable[[], None]]:
    """Forward and backward of the MLP's first Linear and of a LayerNorm, their 1-d parameters ``offset`` elements
    off; each call starts with no gradients, as a training step's backward does."""
    tokens, width, hidden = shape
    g = torch.Generator().manual_seed(0)

    def rand(*size: int, scale: float = 0.02) -> torch.Tensor:
        return (torch.randn(*size, generator=g) * scale).to(device, torch.bfloat16)

    x = rand(tokens // 50, 50, width, scale=1.0).requires_grad_()
    weight, bias = torch.nn.Parameter(rand(hidden, width)), _misplaced(rand(hidden), offset)
    gamma, beta = _misplaced(1 + rand(width), offset), _misplaced(rand(width), offset)
    grad_hidden, grad_width = rand(tokens // 50, 50, hidden, scale=1.0), rand(tokens // 50, 50, width, scale=1.0)

    def run(out: Callable[[], torch.Tensor], grad: torch.Tensor, params: tuple) -> None:
        for t in (x, *params):
            t.grad = None
        out().backward(grad)

    return {
        f"Linear {width}->{hidden} with bias": lambda: run(
            lambda: F.linear(x, weight, bias), grad_hidden, (weight, bias)
        ),
        f"LayerNorm {width}": lambda: run(lambda: F.layer_norm(x, (width,), gamma, beta), grad_width, (gamma, beta)),
    }


def _alignment_kernels(record, device: str, quick: bool) -> None:
    cuda, shape = device == "cuda", MLP_SHAPES[device]
    aligned, offset = _layer_steps(shape, device, 0), _layer_steps(shape, device, 1)  # 1 bf16 element: 2 bytes
    repeats = 3 if quick else 20
    note = "fwd+bwd; fastclip: 16-byte aligned bias/weight, baseline: 2 bytes off (the layout before)"
    results = {}
    for name in aligned:
        for fn in (aligned[name], offset[name]):
            time_fn(fn, repeats=1, warmup=3, cuda=cuda)  # cuBLASLt's heuristics and the allocator settle
        ours, base = time_paired(aligned[name], offset[name], repeats=repeats, cuda=cuda)
        params = {"op": name, "tokens": shape[0], "dtype": "bf16", "device": device}
        results[name] = Result("step_parity", f"{name}, aligned vs 2 bytes off", params, "seconds", ours.median_s,
                               base.median_s, extra={"spread": [ours.spread, base.spread]}, note=note)  # fmt: skip
        record(results[name])
    for name, result in results.items():  # profiled after every timing: a profiler session may slow what follows
        result.extra["kernels"] = {side: profile_step(fn, cuda=cuda, top=8).top for side, fn in
                                   (("aligned", aligned[name]), ("2 bytes off", offset[name]))}  # fmt: skip
        record(result)


@pytest.mark.gpu
def test_alignment_kernels_gpu(record, quick):
    _alignment_kernels(record, "cuda", quick)


def test_alignment_kernels_cpu(record):
    """The same code on the CPU (the op names the profiler sees; CPU kernels care little about 2 bytes)."""
    _alignment_kernels(record, "cpu", quick=True)


@dataclass
class _Side:
    """One setting in the rounds: ``block`` runs ``steps`` steps; ``step`` one more (profiled)."""

    label: str
    block: Callable[[], None]
    step: Callable[[], None]
    resident: int  # bytes its weights, optimizer state and batches hold between steps (CUDA; 0 on a CPU)
    trainer: object = None  # fastclip's Trainer; None for open_clip
    seconds: list[float] = field(default_factory=list)  # per step, a figure per round
    transient: list[int] = field(default_factory=list)  # peak bytes above what was allocated before its block
    failed: str | None = None  # why it stopped being measured (an out-of-memory beside the other sides)


def _allocated(cuda: bool) -> int:
    if not cuda:
        return 0
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _fastclip_side(label, options, *, world, root, common, batch, steps, device) -> _Side:
    from fastclip.data.batch import Batch

    cuda = device == "cuda"
    before = _allocated(cuda)
    trainer = _fastclip_trainer(world, root, steps, (*common, *options))
    fixed = _fixed_batches(2, trainer.image.size, trainer.tokenizer, batch=batch, device=device)
    cycle = (Batch(images=img, texts=txt) for _ in range(10**6) for img, txt in fixed)

    def block() -> None:
        for _ in range(steps):
            trainer.train_step(cycle)
        trainer.meters.collect()  # the numbers reach the host once, as at a log step

    trainer.train_step(cycle)  # the optimizer's state (and a compiled step) come with the first step
    trainer.meters.collect()
    return _Side(label, block, lambda: trainer.train_step(cycle), _allocated(cuda) - before, trainer)


def _open_clip_side(*, model_name, size, tokenizer, batch, steps, device) -> _Side:
    cuda = device == "cuda"
    before = _allocated(cuda)
    runner = OpenClipTrainer(itertools.cycle(_fixed_batches(2, size, tokenizer, batch=batch, device=device)),
                             model_name=model_name, batch=batch, device=device)  # fmt: skip
    runner.epoch(1)
    return _Side(OPEN_CLIP, lambda: runner.epoch(steps), lambda: runner.epoch(1), _allocated(cuda) - before)


@contextlib.contextmanager
def _memory_noted(resident: int, into: list[str]):
    """An out-of-memory in what follows appended to ``into`` (with the bytes the other sides held), not raised: the
    other sides' figures are worth more than the case's end."""
    try:
        yield
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise
        into.append(f"out of memory beside {resident / 2**30:.1f} GiB of the other sides: {str(e)[:160]}")
        _release_cuda()


def _round(sides: list[_Side], steps: int, cuda: bool) -> None:
    for side in (s for s in sides if s.failed is None):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        before, failed = _allocated(cuda), []
        with _memory_noted(sum(s.resident for s in sides) - side.resident, failed):
            seconds = time_fn(side.block, repeats=1, warmup=0, cuda=cuda).median_s / steps
        if failed:
            side.failed = failed[0]
            continue
        side.seconds.append(seconds)
        side.transient.append(torch.cuda.max_memory_allocated() - before if cuda else 0)


@dataclass
class _Case:
    """What the figures of one case need: its parameters, batch, FLOPs a sample and the card's bf16 matmul rate."""

    params: dict
    batch: int
    flops_per_sample: float
    peak: float | None


def _record_rates(record, case: _Case, sides: list[_Side], profiles: dict) -> None:
    """Each fastclip side's samples/s/GPU against open_clip's (medians over the rounds so far), its MFU and peak
    memory, and, once profiled, where its step's time goes beside open_clip's."""
    theirs = next((s for s in sides if s.trainer is None and s.seconds), None)
    base_s = statistics.median(theirs.seconds) if theirs else None
    for side in sides:
        params = {**case.params, "setting": side.label}
        if side.trainer is None or not side.seconds:
            if side.failed:  # measured in no round: the reason is the figure
                record(Result("step_parity", "samples/s/GPU, data excluded", params, "samples_per_second", None,
                              None, note=side.failed))  # fmt: skip
            continue
        ours_s = statistics.median(side.seconds)
        mfu = case.batch / ours_s * case.flops_per_sample / case.peak if case.peak else None
        extra = {
            "mfu": mfu, "rounds_s": side.seconds, "open_clip_rounds_s": theirs.seconds if theirs else None,
            "peak_memory_bytes": side.resident + max(side.transient),
            "open_clip_peak_memory_bytes": theirs.resident + max(theirs.transient) if theirs else None,
        }  # fmt: skip
        note = f"{len(side.seconds)} rounds, alternating; " + (f"MFU {mfu:.0%}" if mfu else "no MFU on a CPU")
        note += "".join(f"; {s.label}: {s.failed}" for s in (side, theirs) if s is not None and s.failed)
        record(Result("step_parity", "samples/s/GPU, data excluded", params, "samples_per_second",
                      case.batch / ours_s, case.batch / base_s if base_s else None, extra=extra,
                      note=note))  # fmt: skip
        if side.label in profiles and theirs is not None:
            record(_kinds_result(params, profiles[side.label], profiles[OPEN_CLIP], (ours_s, base_s)))


def _loader_shards():
    """12 batches of 2,048 at 256 px (img2dataset's usual size for CLIP), in 24 shards: the data-included steps read
    them without an epoch's end in the middle, which a 2,048-sample set would put at every step."""
    from fastclip.data.synthetic import WorldSpec, generate

    world = WorldSpec(train_samples=24 * 1024, val_samples=64, samples_per_shard=1024, image_size=256,
                      per_shard_seeds=True)  # fmt: skip
    return generate(ROOT / ".cache" / "bench-parity-data", world)


def _data_included(record, case: _Case, side: _Side, steps: int) -> None:
    """The default's rate from its own loader (data.num_threads 0: automatic) against its data-excluded rate."""
    trainer = side.trainer
    excluded = case.batch / statistics.median(side.seconds)
    try:
        with fresh_stream(trainer) as stream:
            included = case.batch / _fastclip_run(trainer, stream, steps, repeats=2)
    except Exception as e:  # the data path is another subsystem: its failure is a figure's note, not the case's end
        included, note = None, f"the loader failed: {type(e).__name__}: {e}"[:300]
    else:
        note = f"{included / excluded:.2f}x of data excluded (goal 0.8x)"
    data = trainer.cfg.data
    extra = {"data_excluded": excluded, "workers": data.num_threads, "loader": data.loader,
             "decode_device": data.decode_device}  # fmt: skip
    note += f"; {data.num_threads} workers a rank (automatic); baseline: none (open_clip's loader not on the image)"
    record(Result("step_parity", "samples/s/GPU, data included", {**case.params, "setting": side.label},
                  "samples_per_second", included, None, extra=extra, note=note))  # fmt: skip


def _parity(record, world, *, device: str, model_name: str, batch: int, settings: dict, steps: int, rounds: int,
            flops_per_sample: float, peak: float | None, data: bool) -> None:  # fmt: skip
    cuda = device == "cuda"
    root = _loader_shards() if cuda else _shards("quick")
    common = ("--model.name", model_name, "--data.batch_size", str(batch), "--data.val_shards", "null",
              "--data.num_threads", "0")  # fmt: skip
    sides: list[_Side] = []
    try:
        builds = {label: functools.partial(_fastclip_side, label, options, world=world, root=root, common=common,
                                           batch=batch, steps=steps, device=device)
                  for label, options in settings.items()}  # fmt: skip
        builds[OPEN_CLIP] = lambda: _open_clip_side(
            model_name=model_name,
            size=first.image.size,
            tokenizer=first.tokenizer,
            batch=batch,
            steps=steps,
            device=device,
        )
        for label, build in builds.items():
            first = next((s.trainer for s in sides if s.trainer is not None), None)  # its image size and tokenizer
            if label == OPEN_CLIP and first is None:
                pytest.fail(f"no fastclip side could be built: {[s.failed for s in sides]}")
            failed: list[str] = []
            with _memory_noted(sum(s.resident for s in sides), failed):
                sides.append(build())
            if failed:
                sides.append(_Side(label, None, None, 0, failed=failed[0]))
        case = _Case({"model": model_name, "image_px": first.image.size, "batch": batch, "ranks": 1,
                      "device": device}, batch, flops_per_sample, peak)  # fmt: skip
        for r in range(rounds):
            _round(sides if r % 2 == 0 else sides[::-1], steps, cuda)
            _record_rates(record, case, sides, {})
        profiles: dict = {}
        for side in (s for s in sides if s.failed is None):  # after every timed round: a profiler may slow what follows
            _profile_into(profiles.setdefault(side.label, {}), side.step, cuda=cuda)
        _record_rates(record, case, sides, profiles)
        default = next((s for s in sides if s.label == DEFAULT and s.failed is None), None)
        if data and default is not None:
            _data_included(record, case, default, steps)
    finally:
        for side in sides:
            if side.trainer is not None:
                side.trainer.close()
        if cuda:
            _release_cuda()


def _large_batch() -> int:
    """2,048 (the first run's gap) where every side's resident state fits beside one step's ~30 MB a sample of
    activations (an H200's 141 GB); 1,024 on an 80 GB card."""
    return 2048 if torch.cuda.get_device_properties(0).total_memory >= 120 * 2**30 else 1024


@pytest.mark.gpu
@pytest.mark.parametrize("batch, kind", [("large", "eager"), (256, "eager"), ("large", "compiled")])
def test_step_parity_gpu(record, quick, single_rank, batch, kind):
    from bench_loss import _bf16_matmul_peak

    model_name, _, flops_per_sample = GPU_CASES[0]  # ViT-B/32
    torch._dynamo.reset()
    data = kind == "eager" and batch == "large"  # once, at the large batch
    batch = 256 if quick else _large_batch() if batch == "large" else batch
    _parity(record, single_rank, device="cuda", model_name=model_name, batch=batch,
            settings=EAGER if kind == "eager" else COMPILED, steps=3 if quick else 5, rounds=2 if quick else 3,
            flops_per_sample=flops_per_sample, peak=_bf16_matmul_peak(), data=data)  # fmt: skip


def test_step_parity_cpu(record, quick, single_rank):
    """The rounds, figures and data-included case of the GPU test, on the tiny model (eager sides only: a CPU
    compile would be most of the suite's time)."""
    # quick: the code, not the figures (two rounds: each order once), in bf16 as on a GPU, which this CPU emulates
    steps, rounds, batch = (1, 2, 8) if quick else (4, 3, 16)
    settings = {label: EAGER[label] for label in list(EAGER)[:2]} if quick else EAGER
    _parity(record, single_rank, device="cpu", model_name="fastclip-tiny", batch=batch, settings=settings,
            steps=steps, rounds=rounds, flops_per_sample=0.0, peak=None, data=True)  # fmt: skip
