"""Data path, samples/s: fastclip's DALI loader against open_clip's own webdataset + PIL loader
(open_clip_train.data.get_wds_dataset), on the same generated shards, same cores, tokenization included.

The shards are generated once and cached under .cache/bench-data-*/ with realistic JPEG sizes (448 px
squares of textured scenes, about 40 KB each).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

from harness import Result, bench_time, time_fn

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"full": dict(samples=2048, image_size=448, batches=24), "quick": dict(samples=256, image_size=160, batches=3)}
# batches: measured in 3 blocks (median reported)
BATCH = 64
WORKERS = 2  # the machine's cores: both loaders get the same


def _shards(mode: str) -> Path:
    from fastclip.data.synthetic import WorldSpec, generate

    spec = SPECS[mode]
    root = ROOT / ".cache" / f"bench-data-{mode}"
    shard = spec["samples"] // 8  # open_clip needs a shard per worker (8 on the GPU machine)
    world = WorldSpec(
        train_samples=spec["samples"], val_samples=64, samples_per_shard=shard, image_size=spec["image_size"]
    )
    return generate(root, world)


def _throughput(batches, n_batches: int, blocks: int = 3, timer=time_fn) -> float:
    """Samples/s of a loader: the median over ``blocks`` consecutive blocks of its batches (one iterator
    throughout, so no block pays a pipeline restart), after a first batch that pays the start-up."""
    it = iter(batches)
    next(it)  # pipeline start-up and shuffle-buffer fill are not throughput
    per_block = max(n_batches // blocks, 1)
    seen = []

    def block() -> None:
        seen.append(sum(next(it)[0].shape[0] for _ in range(per_block)))

    timing = timer(block, repeats=blocks, warmup=0)
    return seen[0] / timing.median_s


def _fastclip_batches(root: Path, size: int):
    from fastclip.cli import parse_args
    from fastclip.data.loader import build_loader
    from fastclip.data.tokenizer import build_tokenizer
    from fastclip.model import ImageSpec

    data = parse_args(
        ["--data.train_shards", str(root / "train" / "*.tar"), "--data.batch_size", str(BATCH),
         "--data.num_threads", str(WORKERS), "--data.shuffle_buffer", "512", "--data.loader", "dali"]
    ).data  # fmt: skip
    spec = ImageSpec(size=size, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    loader = build_loader(
        data=data, image=spec, tokenizer=build_tokenizer("ViT-B-32"), train=True, rank=0, world_size=1, seed=0,
        device=torch.device("cpu"),
    )  # fmt: skip
    return loader, ((b.images, b.texts) for b in loader)


def _open_clip_batches(root: Path, n_samples: int, workers: int = WORKERS):
    import open_clip
    from open_clip_train.data import get_wds_dataset
    from open_clip_train.params import parse_args

    shards = sorted(str(p) for p in (root / "train").glob("*.tar"))
    args = parse_args(
        ["--train-data", "::".join(shards), "--train-num-samples", str(n_samples), "--dataset-type", "webdataset",
         "--batch-size", str(BATCH), "--workers", str(workers), "--model", "ViT-B-32"]
    )  # fmt: skip
    args.world_size, args.rank, args.distributed = 1, 0, False
    _, preprocess_train, _ = open_clip.create_model_and_transforms("ViT-B-32")
    info = get_wds_dataset(args, preprocess_train, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-B-32"))
    return info.dataloader


def test_data_cpu(benchmark, record, quick):
    mode = "quick" if quick else "full"
    spec = SPECS[mode]
    root = _shards(mode)
    loader, ours_batches = _fastclip_batches(root, 224)
    try:
        ours = _throughput(ours_batches, spec["batches"], timer=functools.partial(bench_time, benchmark))
    finally:
        loader.close()
    theirs = _throughput(_open_clip_batches(root, spec["samples"]), spec["batches"])
    params = {"image_px": spec["image_size"], "crop_px": 224, "batch": BATCH, "workers": WORKERS,
              "cores": os.cpu_count(), "device": "cpu"}  # fmt: skip
    record(Result("data", "loader throughput (decode, crop, normalize, tokenize)", params, "samples_per_second",
                  ours, theirs, note="fastclip: DALI CPU pipeline; open_clip: get_wds_dataset with PIL"))  # fmt: skip
    benchmark.extra_info.update(params=params, fastclip=ours, open_clip=theirs, ratio=ours / theirs)


@pytest.mark.gpu
def test_data_gpu(benchmark, record, quick):
    """On a GPU machine without DALI: fastclip's torch loader with nvJPEG batch decode vs open_clip's loader."""
    from fastclip.cli import parse_args
    from fastclip.data.loader import build_loader
    from fastclip.data.tokenizer import build_tokenizer
    from fastclip.model import ImageSpec

    mode = "quick" if quick else "full"
    spec, workers = SPECS[mode], 8
    root = _shards(mode)
    data = parse_args(
        ["--data.train_shards", str(root / "train" / "*.tar"), "--data.batch_size", str(BATCH),
         "--data.num_threads", str(workers), "--data.shuffle_buffer", "512", "--data.loader", "torch"]
    ).data  # fmt: skip
    image = ImageSpec(size=224, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    loader = build_loader(
        data=data, image=image, tokenizer=build_tokenizer("ViT-B-32"), train=True, rank=0, world_size=1, seed=0,
        device=torch.device("cuda"),
    )  # fmt: skip
    try:
        timer = functools.partial(bench_time, benchmark)
        ours = _throughput(((b.images, b.texts) for b in loader), spec["batches"], timer=timer)
    finally:
        loader.close()
    theirs = _throughput(_open_clip_batches(root, spec["samples"], workers), spec["batches"])
    params = {"image_px": spec["image_size"], "crop_px": 224, "batch": BATCH, "workers": workers, "device": "cuda"}
    record(Result("data", "loader throughput (decode, crop, normalize, tokenize)", params, "samples_per_second",
                  ours, theirs, note="fastclip: torch loader + nvJPEG; open_clip: PIL in workers"))  # fmt: skip
