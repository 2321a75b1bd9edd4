"""Data at scale (issue 11), CPU: start-up to the first batch on 10 to 10,000 shards, and the index tool's speed.

start-up: fastclip (resolve the shards, build the loader, take its first batch) with the index tool's files, and
without them, against open_clip's get_wds_dataset with --train-num-samples (its way not to count) and its first
batch. Tiny shards (a few 24 px JPEGs each), so that what grows with the shard count shows, not decoding; generated
once under .cache/bench-startup-N/ (shards/ and, written once by the index tool, index/).

index tool: ``index_shards(workers=2)`` (what ``python -m fastclip.data.shards index --workers 2`` runs) against
DALI's own wds2idx (IndexCreator, GNU tar underneath) in a pool of 2 processes, on 64 shards of 100 web photos
(bench_data.py's, 64 KB JPEGs; .cache/bench-index-MODE/), read from the page cache. fastclip checks every sample
(its image's magic bytes and end marker, a UTF-8 caption; --deep decodes each image); wds2idx lists the tar's
members and checks nothing. Both write the same index files (checked).
"""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import os
import shutil
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
import torch

import bench_data
from bench_data import BATCH, ROOT, WORKERS, open_clip_args, open_clip_preprocess, photo_shards
from harness import Result, Timing, bench_paired

SHARD_COUNTS = (10, 1_000, 10_000)
QUICK_MAX_SHARDS = 1_000
SHUFFLE = BATCH  # samples both loaders hold before their first one (fastclip's shuffle buffer, open_clip's fill)
REPEATS = {"full": 7, "quick": 1}  # rounds, after one warm-up round in the full run
IMAGE_MEAN, IMAGE_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _per_shard(n: int) -> int:
    """Samples per tiny shard: a few batches in all on few shards, two each on many."""
    return max(math.ceil(4 * BATCH / n), 2)


def _tiny_jpegs() -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def startup_shards(n: int) -> Path:
    """``n`` tiny shards under .cache/bench-startup-N/shards/, their index files and sizes.json under index/ (the
    index tool's --index-dir, so the same shards also serve as unindexed). Made once; a DONE file marks them whole."""
    from fastclip.data.index import index_shards

    root = ROOT / ".cache" / f"bench-startup-{n}"
    done = root / "DONE"
    if done.exists() and done.read_text() == str(_per_shard(n)):
        return root
    shutil.rmtree(root, ignore_errors=True)
    (root / "shards").mkdir(parents=True)
    jpegs, per = _tiny_jpegs(), _per_shard(n)
    for s in range(n):
        samples = [(f"{s:05d}{i:03d}", {"jpg": jpegs[(s + i) % 4], "txt": f"a photo of thing {s} {i}".encode()})
                   for i in range(per)]  # fmt: skip
        bench_data.write_shard(root / "shards" / f"{s:05d}.tar", samples)
    index_shards([str(p) for p in _paths(root, n)], index_dir=str(root / "index"), workers=2)
    done.write_text(str(per))
    return root


def _paths(root: Path, n: int) -> list[Path]:
    return [root / "shards" / f"{s:05d}.tar" for s in range(n)]


def _spec(root: Path, n: int) -> str:
    """A brace range, which both fastclip and open_clip expand."""
    return str(root / "shards" / f"{{00000..{n - 1:05d}}}.tar")


def _fastclip_first_batch(spec: str, *, loader: str, index_dir: str | None) -> None:
    """fastclip's start-up to its first batch: parse the data config, resolve the shards, build the loader, take a
    batch, shut it down. The header-walk cache of this process is emptied first: it would spare a repeat the
    counting that a fresh run pays."""
    from fastclip.cli import parse_args
    from fastclip.data import tar_layout
    from fastclip.data.build import build_loader
    from fastclip.model import ImageSpec

    tar_layout._walk_cached.cache_clear()
    argv = ["--data.train_shards", spec, "--data.batch_size", str(BATCH), "--data.num_threads", str(WORKERS),
            "--data.shuffle_buffer", str(SHUFFLE), "--data.loader", loader]  # fmt: skip
    if index_dir:
        argv += ["--data.index_dir", index_dir]
    data = parse_args(argv).data
    image = ImageSpec(size=224, mean=IMAGE_MEAN, std=IMAGE_STD)
    built = build_loader(data=data, image=image, tokenizer=_tokenizer(), train=True, rank=0, world_size=1, seed=0,
                         device=torch.device("cpu"))  # fmt: skip
    try:
        it = iter(built)
        assert next(it).images.shape[0] == BATCH
        del it  # the DataLoader's workers stop with their iterator
    finally:
        built.close()


@functools.cache
def _tokenizer():
    from fastclip.data.tokenizer import build_tokenizer

    return build_tokenizer("ViT-B-32")


def _open_clip_first_batch(spec: str, n_samples: int, monkeypatch) -> None:
    """open_clip's start-up to its first batch: get_wds_dataset with --train-num-samples, a batch, workers stopped.
    Its sample shuffle is set to fill SHUFFLE samples as fastclip's does (its default fills 1,000 per worker)."""
    import open_clip_train.data as oc_data

    monkeypatch.setattr(oc_data, "_SAMPLE_SHUFFLE_INITIAL", SHUFFLE)
    monkeypatch.setattr(oc_data, "_SAMPLE_SHUFFLE_SIZE", SHUFFLE)
    preprocess, tokenizer = open_clip_preprocess()
    info = oc_data.get_wds_dataset(open_clip_args(spec, n_samples), preprocess, is_train=True, epoch=0,
                                   tokenizer=tokenizer)  # fmt: skip
    it = iter(info.dataloader)
    assert next(it)[0].shape[0] == BATCH
    del it


def _timing(times: list[float]) -> Timing:
    return Timing(statistics.median(times), min(times), max(times), len(times))


def _rounds(benchmark, ours, others: dict, *, repeats: int) -> tuple[Timing, dict[str, Timing]]:
    """``ours`` under pytest-benchmark's fixture, alternating round by round with each of ``others`` (the baseline
    first), all on one clock: the drift of the machine reaches every figure alike."""
    times: dict[str, list[float]] = {name: [] for name in others}

    def setup() -> None:
        for name, fn in others.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    mine, _ = bench_paired(benchmark, ours, setup, repeats=repeats)
    return mine, {name: _timing(t) for name, t in times.items()}


def _spread(t: Timing) -> dict:
    return {"min_s": t.min_s, "max_s": t.max_s, "runs": t.runs}


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
def test_startup_vs_shard_count(benchmark, record, quick, monkeypatch, n_shards):
    if quick and n_shards > QUICK_MAX_SHARDS:
        pytest.skip(f"full run only (quick mode stops at {QUICK_MAX_SHARDS} shards)")
    mode = "quick" if quick else "full"
    root = startup_shards(n_shards)
    spec, index_dir = _spec(root, n_shards), str(root / "index")
    samples = n_shards * _per_shard(n_shards)
    variants = {  # fastclip's other figures, timed in the same rounds
        "open_clip": lambda: _open_clip_first_batch(spec, samples, monkeypatch),
        "DALI, index files": lambda: _fastclip_first_batch(spec, loader="dali", index_dir=index_dir),
        "torch loader, no index files": lambda: _fastclip_first_batch(spec, loader="torch", index_dir=None),
        "DALI, no index files": lambda: _fastclip_first_batch(spec, loader="dali", index_dir=None),
    }
    torch_indexed = functools.partial(_fastclip_first_batch, spec, loader="torch", index_dir=index_dir)
    if not quick:  # imports, DALI's libraries, the tokenizer's and the transform's first use: not start-up of a run
        torch_indexed()
        for fn in variants.values():
            fn()
    ours, figures = _rounds(benchmark, torch_indexed, variants, repeats=REPEATS[mode])
    base = figures.pop("open_clip")
    figures = {"torch loader, index files": ours, **figures}
    params = {"shards": n_shards, "samples_per_shard": _per_shard(n_shards), "batch": BATCH, "workers": WORKERS,
              "shuffle_fill": SHUFFLE, "device": "cpu"}  # fmt: skip
    notes = {
        "torch loader, index files": "counts from sizes.json, up to 64 shards opened",
        "DALI, index files": "DALI on the CPU, reading every index file",
        "torch loader, no index files": "counts every shard's tar headers first (logged past 100 shards)",
        "DALI, no index files": "DALI on the CPU, reading every tar's headers itself",
    }
    for name, t in figures.items():
        record(Result("data", f"start-up to the first batch, {name}", params, "seconds", t.median_s,
                      base.median_s, extra={"fastclip": _spread(t), "open_clip": _spread(base)},
                      note=f"fastclip: {notes[name]}; open_clip: --train-num-samples"))  # fmt: skip
    benchmark.extra_info.update(params=params, open_clip=base.median_s,
                                **{name: t.median_s for name, t in figures.items()})  # fmt: skip


# --- the index tool ---------------------------------------------------------------------------------------------


INDEX_SPECS = {"full": dict(shards=64, per_shard=100), "quick": dict(shards=4, per_shard=32)}


def index_tool_shards(mode: str) -> list[str]:
    """Shards of web photos for the index tool, under .cache/bench-index-MODE/: bench_data.py's photographs (each
    used about three times in the full set) repacked as INDEX_SPECS says, made once."""
    spec = INDEX_SPECS[mode]
    root = ROOT / ".cache" / f"bench-index-{mode}"
    paths = [str(root / f"{s:05d}.tar") for s in range(spec["shards"])]
    done = root / "DONE"
    if done.exists() and done.read_text() == str(spec):
        return paths
    photos = []
    for shard in sorted((photo_shards(mode) / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar}
        photos += [(files[name], files[name[:-3] + "txt"]) for name in files if name.endswith(".jpg")]
    root.mkdir(parents=True, exist_ok=True)
    for s, path in enumerate(paths):
        picks = (photos[(s * spec["per_shard"] + i) % len(photos)] for i in range(spec["per_shard"]))
        bench_data.write_shard(Path(path), [(f"{s:05d}{i:04d}", {"jpg": jpg, "txt": txt}) for i, (jpg, txt) in
                                            enumerate(picks)])  # fmt: skip
    done.write_text(str(spec))
    return paths


def _wds2idx_one(job: tuple[str, str]) -> None:
    from wds2idx import IndexCreator

    with IndexCreator(job[0], job[1], verbose=False) as creator:
        creator.create_index()


def _wds2idx(paths: list[str], out: str) -> None:
    """DALI's wds2idx over ``paths``, 2 processes (its CLI indexes one tar per call)."""
    jobs = [(p, os.path.join(out, Path(p).stem + ".idx")) for p in paths]
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        pool.map(_wds2idx_one, jobs, chunksize=1)


def _fastclip_index(paths: list[str], out: str, *, deep: bool) -> None:
    from fastclip.data.index import index_shards

    found = index_shards(paths, index_dir=out, workers=WORKERS, deep=deep)
    assert all(f.error is None and not f.left_out for f in found), [f for f in found if f.error or f.left_out]


def _same_index(ours: str, theirs: str, paths: list[str]) -> None:
    """Both tools wrote the same entries (the photo shards hold no bad sample)."""
    from fastclip.data.index import index_path

    for p in paths:  # ours in the index folder's subfolder for the shards' folder
        name = Path(p).stem + ".idx"
        assert Path(index_path(p, ours)).read_text() == Path(theirs, name).read_text(), name


def test_index_tool_throughput(benchmark, record, quick):
    mode = "quick" if quick else "full"
    paths = index_tool_shards(mode)
    megabytes = sum(os.path.getsize(p) for p in paths) / 1e6
    samples = INDEX_SPECS[mode]["shards"] * INDEX_SPECS[mode]["per_shard"]
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as tmp:
        dirs = {name: os.path.join(tmp, name) for name in ("fastclip", "deep", "wds2idx")}
        for d in dirs.values():
            os.makedirs(d)
        variants = {
            "wds2idx": lambda: _wds2idx(paths, dirs["wds2idx"]),
            "deep": lambda: _fastclip_index(paths, dirs["deep"], deep=True),
        }
        ours = functools.partial(_fastclip_index, paths, dirs["fastclip"], deep=False)
        if not quick:  # pools' and imports' first start (the shards are in the page cache for every figure alike)
            ours()
            for fn in variants.values():
                fn()
        cheap, others = _rounds(benchmark, ours, variants, repeats=REPEATS[mode])
        _same_index(dirs["fastclip"], dirs["wds2idx"], paths)
    base = others["wds2idx"]
    params = {"shards": len(paths), "samples": samples, "megabytes": round(megabytes, 1), "workers": WORKERS,
              "images": "photos, JPEG q90", "device": "cpu"}  # fmt: skip

    def rates(t: Timing) -> dict:
        return {"shards_per_s": len(paths) / t.median_s, "samples_per_s": samples / t.median_s,
                "mb_per_s": megabytes / t.median_s, **_spread(t)}  # fmt: skip

    for case, t, what in (
        ("index tool", cheap, "checks every sample's image ends and caption"),
        ("index tool --deep", others["deep"], "decodes every image"),
    ):
        record(Result("data", case, params, "seconds", t.median_s, base.median_s,
                      extra={"fastclip": rates(t), "baseline": rates(base)},
                      note=f"fastclip {what}; baseline: DALI's wds2idx, which checks nothing"))  # fmt: skip
    benchmark.extra_info.update(params=params, fastclip=cheap.median_s, deep=others["deep"].median_s,
                                wds2idx=base.median_s)  # fmt: skip
