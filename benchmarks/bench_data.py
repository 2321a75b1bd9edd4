"""Data path, samples/s: fastclip's DALI loader against open_clip's own webdataset + PIL loader
(open_clip_train.data.get_wds_dataset), on the same generated shards, same cores, tokenization included.

Two sets of shards, each generated once and cached under .cache/: the synthetic world's (.cache/bench-data-*/,
448 px squares of textured scenes, about 40 KB each) and photographs (.cache/bench-photos-*/: random crops of
scikit-image's bundled photographs at 400-640 x 300-480 px, JPEG quality 90, 23-109 KB, median about 64 KB, as
img2dataset stores LAION's images).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import tarfile
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
    world = WorldSpec(train_samples=spec["samples"], val_samples=64, samples_per_shard=shard,
                      image_size=spec["image_size"], per_shard_seeds=True)  # shards rendered in parallel  # fmt: skip
    return generate(root, world)


PHOTO_SPECS = {"full": dict(shards=16, per_shard=128, batches=24), "quick": dict(shards=4, per_shard=32, batches=3)}
PHOTO_QUALITY = 90  # img2dataset's default JPEG quality
_WORDS = (
    "vintage red bicycle leaning against a brick wall in the old town at sunset stock photo of a happy family "
    "having a picnic on green grass near the lake modern kitchen interior with white cabinets and wooden table "
    "close-up of a cat sleeping on a sofa mountain landscape with snow peaks and a blue sky aerial view of the "
    "city at night handmade ceramic coffee mug 12 oz gift for mom astronaut portrait NASA 1984 space shuttle"
).split()


def _photo_sources() -> list:
    """scikit-image's bundled photographs (RGB uint8), the ones that need no download."""
    import numpy as np
    import skimage.data

    left, right, _ = skimage.data.stereo_motorcycle()
    images = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket(),
              skimage.data.camera(), left, right, skimage.data.hubble_deep_field()]  # fmt: skip
    return [np.stack([im] * 3, axis=-1) if im.ndim == 2 else im for im in images]


def _photo(rng, sources) -> bytes:
    """A web photo's JPEG: a random crop of 400-640 x 300-480 px from a photograph scaled to cover it (1-1.2x),
    flipped at random, sharpened as web images usually are, quality 90."""
    from PIL import Image, ImageFilter

    img = Image.fromarray(sources[int(rng.integers(len(sources)))])
    w, h = int(rng.integers(400, 641)), int(rng.integers(300, 481))
    scale = max(w / img.width, h / img.height) * rng.uniform(1.0, 1.2)
    img = img.resize((math.ceil(img.width * scale), math.ceil(img.height * scale)), Image.Resampling.BICUBIC)
    x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
    img = img.crop((x, y, x + w, y + h)).filter(ImageFilter.UnsharpMask(radius=1.5, percent=80, threshold=0))
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=PHOTO_QUALITY)
    return out.getvalue()


def write_shard(path: Path, samples) -> None:
    """A webdataset tar of ``samples`` ((key, {ext: bytes})), written to a temporary name and renamed into place."""
    tmp = path.with_suffix(".tar.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)


def photo_shards(mode: str) -> Path:
    """The photo shards of ``mode`` under .cache/bench-photos-MODE/train/, generated once (reused while the spec
    in spec.json matches). Captions: 6-24 words of alt-text, drawn from a small vocabulary."""
    import numpy as np

    spec = {**PHOTO_SPECS[mode], "quality": PHOTO_QUALITY, "version": 1}
    spec.pop("batches")
    root = ROOT / ".cache" / f"bench-photos-{mode}"
    marker = root / "spec.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return root
    (root / "train").mkdir(parents=True, exist_ok=True)
    rng, sources = np.random.default_rng(0), _photo_sources()
    for s in range(spec["shards"]):
        samples = []
        for i in range(spec["per_shard"]):
            caption = " ".join(rng.choice(_WORDS, size=int(rng.integers(6, 25))))
            samples.append((f"{s:05d}{i:04d}", {"jpg": _photo(rng, sources), "txt": caption.encode()}))
        write_shard(root / "train" / f"{s:05d}.tar", samples)
    marker.write_text(json.dumps(spec))
    return root


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


def _fastclip_batches(root: Path, size: int, loader: str = "dali", *, spec: str | None = None, extra=()):
    from fastclip.cli import parse_args
    from fastclip.data.build import build_loader
    from fastclip.data.tokenizer import build_tokenizer
    from fastclip.model import ImageSpec

    data = parse_args(
        ["--data.train_shards", spec or str(root / "train" / "*.tar"), "--data.batch_size", str(BATCH),
         "--data.num_threads", str(WORKERS), "--data.shuffle_buffer", "512", "--data.loader", loader, *extra]
    ).data  # fmt: skip
    spec = ImageSpec(size=size, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))
    loader = build_loader(
        data=data, image=spec, tokenizer=build_tokenizer("ViT-B-32"), train=True, rank=0, world_size=1, seed=0,
        device=torch.device("cpu"),
    )  # fmt: skip
    return loader, ((b.images, b.texts) for b in loader)


@functools.cache
def open_clip_preprocess():
    """open_clip's ViT-B-32 train transform and tokenizer (built once per process: it builds the model)."""
    import open_clip

    _, preprocess_train, _ = open_clip.create_model_and_transforms("ViT-B-32")
    return preprocess_train, open_clip.get_tokenizer("ViT-B-32")


def open_clip_args(shards: str, n_samples: int, workers: int = WORKERS, batch: int = BATCH):
    """open_clip_train's args for get_wds_dataset: ``shards`` as its --train-data ('::' lists, brace ranges),
    --train-num-samples set (its documented way not to count the samples), one rank."""
    from open_clip_train.params import parse_args

    args = parse_args(
        ["--train-data", shards, "--train-num-samples", str(n_samples), "--dataset-type", "webdataset",
         "--batch-size", str(batch), "--workers", str(workers), "--model", "ViT-B-32"]
    )  # fmt: skip
    args.world_size, args.rank, args.distributed = 1, 0, False
    return args


def _open_clip_batches(root: Path, n_samples: int, workers: int = WORKERS, *, shards: str | None = None):
    from open_clip_train.data import get_wds_dataset

    shards = shards or "::".join(sorted(str(p) for p in (root / "train").glob("*.tar")))
    preprocess_train, tokenizer = open_clip_preprocess()
    info = get_wds_dataset(open_clip_args(shards, n_samples, workers), preprocess_train, is_train=True,
                           tokenizer=tokenizer)  # fmt: skip
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
@pytest.mark.parametrize("kind", ["torch", "dali"])
def test_data_gpu(benchmark, record, quick, kind):
    """fastclip's GPU decode against open_clip's loader: the torch loader with nvJPEG batch decode, and DALI's mixed
    decoder where DALI is installed (the GPU image lacks it: benchmarks/gpu_dali.sh brings it)."""
    from fastclip.cli import parse_args
    from fastclip.data.build import build_loader, dali_available
    from fastclip.data.tokenizer import build_tokenizer
    from fastclip.model import ImageSpec

    if kind == "dali" and not dali_available():
        pytest.skip("needs nvidia-dali (benchmarks/gpu_dali.sh installs it on the GPU machine)")
    mode = "quick" if quick else "full"
    spec, workers = SPECS[mode], 8
    root = _shards(mode)
    data = parse_args(
        ["--data.train_shards", str(root / "train" / "*.tar"), "--data.batch_size", str(BATCH),
         "--data.num_threads", str(workers), "--data.shuffle_buffer", "512", "--data.loader", kind]
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
    params = {"image_px": spec["image_size"], "crop_px": 224, "batch": BATCH, "workers": workers, "device": "cuda",
              "loader": kind}  # fmt: skip
    how = {"torch": "torch loader + nvJPEG", "dali": "DALI, mixed (GPU) decode"}[kind]
    record(Result("data", "loader throughput (decode, crop, normalize, tokenize)", params, "samples_per_second",
                  ours, theirs, note=f"fastclip: {how}; open_clip: PIL in workers"))  # fmt: skip


def test_data_photos_cpu(benchmark, record, quick):
    """The loader case on web-photo-sized JPEGs (about 500 x 400 px, 64 KB), where decoding and resizing cost what
    they do in a LAION run: DALI's CPU pipeline (what test_data_cpu measures) and the torch loader (what
    data.loader 'auto' picks on a machine without a GPU), each against open_clip's loader measured in the same
    run."""
    mode = "quick" if quick else "full"
    spec = PHOTO_SPECS[mode]
    root = photo_shards(mode)
    # open_clip's epoch ends after train_num_samples: long enough for every batch timed (its workers repeat shards)
    samples = max(spec["shards"] * spec["per_shard"], (spec["batches"] + 2 * WORKERS) * BATCH)
    ours = {}
    for kind in ("dali", "torch"):
        loader, batches = _fastclip_batches(root, 224, kind)
        timer = functools.partial(bench_time, benchmark) if kind == "dali" else time_fn  # the fixture times once
        try:
            ours[kind] = _throughput(batches, spec["batches"], timer=timer)
        finally:
            loader.close()
            del batches
    theirs = _throughput(_open_clip_batches(root, samples), spec["batches"])
    params = {"images": "photos 400-640 x 300-480", "crop_px": 224, "batch": BATCH, "workers": WORKERS,
              "cores": os.cpu_count(), "device": "cpu"}  # fmt: skip
    notes = {"dali": "fastclip: DALI CPU pipeline",
             "torch": "fastclip: torch loader, 'auto' on CPUs (torchvision decode and resize)"}  # fmt: skip
    for kind, case in (("dali", "loader throughput on photos (decode, crop, normalize, tokenize)"),
                       ("torch", "loader throughput on photos, torch loader")):  # fmt: skip
        note = f"{notes[kind]}; open_clip: get_wds_dataset with PIL; JPEG q90, median 64 KB"
        record(Result("data", case, params, "samples_per_second", ours[kind], theirs, note=note))
    benchmark.extra_info.update(params=params, fastclip_dali=ours["dali"], fastclip_torch=ours["torch"],
                                open_clip=theirs, ratio=ours["dali"] / theirs)  # fmt: skip
