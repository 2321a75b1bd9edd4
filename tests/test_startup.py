"""Start-up: the rendezvous port of a run, and what it says about the weights it starts from."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import tarfile

import pytest
import torch

from fastclip.config import ModelConfig
from fastclip.model import build_model, open_clip_state_dict

from runs import ROOT, clean_env

# Each child initializes its own process group: the test session may hold one already (conftest's single_rank).
_INIT = """
import os, sys
from fastclip.errors import ConfigError
from fastclip.world import close_distributed, join_world
try:
    world = join_world()
except ConfigError as e:
    print("error:", e)
    sys.exit(2)
print("world:", os.environ["MASTER_PORT"], world.rank, world.world_size)
close_distributed()
"""

# occupies the port the old code derived from this process's pid, before asking for a process group
_PID_PORT_BUSY = """
import os, socket
pid_port = 29500 + os.getpid() % 1000
sock = socket.socket()
try:
    sock.bind(("", pid_port))
    sock.listen()
except OSError:
    pass  # someone else holds it already: just as busy
print("pid port:", pid_port)
"""

_RANDOM_INIT = "Model initialized randomly"


def _python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_taken_master_port_is_a_one_line_error(busy_port):
    env = {**clean_env(), "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(busy_port)
    proc = _python(_INIT, env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    [line] = [x for x in proc.stdout.splitlines() if x.startswith("error:")]
    assert f"MASTER_PORT {busy_port} is already in use" in line and "--master_port" in line


def test_train_says_the_taken_port_in_one_line(busy_port, tmp_path):
    shard = tmp_path / "shard-000.tar"
    member = tmp_path / "0.txt"
    member.write_text("a")
    with tarfile.open(shard, "w") as tar:
        tar.add(member, arcname="0.txt")
    # train_num_samples: the start-up check counts the run's steps, and this shard's caption alone makes none
    args = ["--data.train_shards", str(shard), "--data.val_shards", str(shard), "--data.train_num_samples", "64"]
    proc = subprocess.run(
        [sys.executable, "-m", "fastclip.train", *args],
        cwd=tmp_path,
        env={**clean_env(), "MASTER_PORT": str(busy_port), "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("fastclip:")]
    assert line.startswith(f"fastclip: MASTER_PORT {busy_port} is already in use")


def test_single_rank_run_picks_a_free_port_not_the_pid_one():
    proc = _python(_PID_PORT_BUSY + _INIT, clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    said = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    pid_port, (port, rank, world_size) = said["pid port"], said["world"].split()
    assert port != pid_port and (rank, world_size) == ("0", "1")


def test_free_port_is_free():
    from fastclip.world import free_port

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("", port))  # raises if anything holds it


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(1)  # not the seed the model under test starts from, so equal weights mean loaded ones
    state = open_clip_state_dict(build_model(ModelConfig(name="fastclip-tiny")).state_dict())
    path = tmp_path_factory.mktemp("pretrained") / "tiny.pt"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("level", [logging.WARNING, logging.INFO], ids=["warning", "info"])
def test_pretrained_weights_are_loaded_and_said_truthfully(tiny_checkpoint, caplog, capsys, level):
    from fastclip import console

    path, saved = tiny_checkpoint
    console.setup(0)  # as a run does: fastclip's lines go to the console through its own handler
    caplog.set_level(level)
    filters = list(logging.getLogger().filters)
    torch.manual_seed(0)
    clip = build_model(ModelConfig(name="fastclip-tiny", pretrained=str(path)))
    out, err = capsys.readouterr()
    said = caplog.text + out + err
    assert _RANDOM_INIT not in said
    assert f"loaded {len(saved)} tensors from {path} into fastclip-tiny" in said
    loaded = open_clip_state_dict(clip.state_dict())
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert logging.getLogger().filters == filters  # open_clip's warning is hidden for that one call only


def test_pretrained_line_reaches_the_console(tiny_checkpoint):
    path, _ = tiny_checkpoint
    code = (
        "from fastclip import console\nfrom fastclip.config import ModelConfig\n"
        "from fastclip.model import build_model\nconsole.setup(0)\n"
        f"build_model(ModelConfig(name='fastclip-tiny', pretrained={str(path)!r}))\n"
    )
    proc = _python(code, clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _RANDOM_INIT not in proc.stdout + proc.stderr
    assert f"fastclip: loaded {len(torch.load(path))} tensors from {path} into fastclip-tiny" in proc.stdout
    proc = _python(code.replace(f", pretrained={str(path)!r}", ""), clean_env())
    assert _RANDOM_INIT in proc.stderr  # still said when it is true


@pytest.mark.parametrize(
    "content, said",
    [
        (b"these bytes are no checkpoint" * 8, "is not a torch checkpoint file (it starts with 74 68 65 73"),
        ([1, 2, 3], "does not load into fastclip-tiny: AttributeError"),
    ],
)
def test_a_pretrained_file_that_does_not_load_is_one_line(tmp_path, content, said):
    from fastclip.cli import parse_args
    from fastclip.errors import ConfigError
    from fastclip.preflight import check_inputs

    path = tmp_path / "weights.pt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(ConfigError, match=r"model\.pretrained: .*weights\.pt") as err:
        check_inputs(parse_args(["--model.pretrained", str(path)]))  # before any model is built
        build_model(ModelConfig(force_image_size=32, pretrained=str(path)))
    assert said in str(err.value) and "\n" not in str(err.value) and "weights_only" not in str(err.value)


def test_a_partial_deepspeed_config_trains_with_fastclips_other_settings(single_rank, world_dir, tmp_path, capsys):
    import json

    from fastclip.cli import parse_args
    from fastclip.trainer import Trainer

    from runs import small_run_args

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 1, "reduce_bucket_size": 5 * 10**7}}))
    args = small_run_args(world_dir, tmp_path, steps=2) + ["--deepspeed_config", str(ds), "--log.every", "1000"]
    trainer = Trainer(parse_args(args + ["--train.zero_stage", "1", "--train.precision", "bf16"]), single_rank)
    try:
        trainer.train_step(iter(trainer.train_loader))
        assert trainer.stage == 1 and trainer.engine.zero_reduce_bucket_size() == 5 * 10**7
        assert trainer.precision == "bf16" and trainer.engine.gradient_clipping() == 1.0  # the run config's
        assert trainer.ds_config["timers"]["throughput"]["enabled"] is False  # fastclip's, kept under the file's
        assert trainer.ds_config["optimizer"]["type"] == "AdamW"
    finally:
        trainer.close()
    out = capsys.readouterr().out
    assert f"deepspeed: {ds} merged over the derived config" in out
    # data.num_threads 0, the default: resolved from this rank's CPUs (the single-rank world shares them with none)
    cores = len(os.sched_getaffinity(0))
    workers = min(cores, 16)
    assert f"data: {workers} DataLoader workers per rank ({cores} cores this rank may use / 1 rank(s) sharing" in out
    assert trainer.cfg.data.num_threads == workers == trainer.train_loader.workers


def test_automatic_data_threads_share_a_nodes_cores(monkeypatch, capsys):
    """data.num_threads 0: a rank's CPUs divided among the ranks of its node that may run on the same ones; a
    launcher that binds each rank to its own cores leaves each all of them; 1 to 16."""
    from fastclip.config import DataConfig
    from fastclip.data import loader
    from fastclip.data.build import with_threads
    from fastclip.world import World

    def world(rank: int, cpus: list[list[int]], nodes: list[str]) -> World:
        members = tuple({"node": n, "cpus": c} for n, c in zip(nodes, cpus))
        return World(rank, len(members), 0, torch.device("cpu"), members=members)

    shared = world(1, [list(range(96))] * 8 + [list(range(96))] * 8, ["a"] * 8 + ["b"] * 8)
    bound = world(3, [list(range(12 * r, 12 * r + 12)) for r in range(8)], ["a"] * 8)
    assert (shared.cpu_sharers, shared.local_world_size, bound.cpu_sharers) == (8, 8, 1)
    assert World(0, 1, 0, torch.device("cpu")).cpu_sharers == 1  # before the world is known
    for cores, sharers, threads in ((96, 8, 12), (12, 1, 12), (128, 1, 16), (2, 4, 1), (97, 8, 12)):
        monkeypatch.setattr(loader, "cpu_set", lambda cores=cores: list(range(cores)))
        assert loader.auto_threads(sharers)[0] == threads, (cores, sharers)
    data = DataConfig(num_threads=3)
    assert with_threads(data, 8) == data
    assert "data: 3 DataLoader workers per rank (data.num_threads)" in capsys.readouterr().out


# --- start-up on many shards (issue 11): counts from the index tool's files or data.train_num_samples -------------


def _tiny_shards(root, n: int, per_shard: int) -> str:
    """``n`` shards of ``per_shard`` 16 px samples each."""
    import io

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True)
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(jpeg, format="JPEG")
    for s in range(n):
        with open(root / f"{s:05d}.tar", "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            for i in range(per_shard):
                for ext, data in (("jpg", jpeg.getvalue()), ("txt", f"a red square {s} {i}".encode())):
                    info = tarfile.TarInfo(f"{s:05d}{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / "*.tar")


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """10,000 tiny shards of one sample, once with the index tool's files and once without."""
    from fastclip.data.index import index_shards

    root = tmp_path_factory.mktemp("many")
    n, sets = 10_000, {}
    sets[n, "plain"] = _tiny_shards(root / "plain", n, 1)
    sets[n, "indexed"] = _tiny_shards(root / "indexed", n, 1)
    index_shards(sorted(str(p) for p in (root / "indexed").glob("*.tar")), workers=2)
    return sets


def test_start_up_without_counts_says_why_it_is_slow_and_what_to_do(many_shards, capfd, monkeypatch):
    from fastclip.data import shard_specs
    from fastclip.data.dali import _reader_shards

    monkeypatch.setattr(shard_specs, "_said", set())
    found = shard_specs.resolve_shards(many_shards[10_000, "plain"], field="data.train_shards", count=True)
    assert found.total == 10_000
    _reader_shards(found, field="data.train_shards", resampled=False, seed=0, rank=0)
    err = capfd.readouterr().err
    assert "counting the samples of 10000 of 10000 shards (e.g. " in err and "by reading every tar header" in err
    assert "10000 of 10000 shards have no index file, so DALI reads every tar header" in err
    assert err.count("python -m fastclip.data.shards index") == 2 and "data.train_num_samples" in err


@pytest.mark.parametrize("kind, counts", [("dali", "indexed"), ("torch", "indexed"), ("torch", "train_num_samples")])
def test_start_up_on_10000_shards_opens_only_what_it_reads(many_shards, monkeypatch, tmp_path, kind, counts):
    """fastclip's start-up on 10,000 shards, counted in the tars it opens (its time against open_clip's is a
    benchmark's: benchmarks/bench_data_scale.py): the start-up check opens the data.check_shards tars (and the first
    one's members for the format probe) and the first batch the shards it reads, however many shards there are.
    Counts come from the index tool's files or data.train_num_samples; DALI's own reader is not counted here."""
    import torch

    from fastclip.cli import parse_args
    from fastclip.data import shard_specs, shard_stream, tar_layout
    from fastclip.data.build import build_loader
    from fastclip.model import ImageSpec
    from fastclip.preflight import check_inputs

    log = tmp_path / "opened.txt"

    def logged(real):
        def opener(name=None, *args, **kwargs):
            with open(log, "a", encoding="utf-8") as f:  # one append a line: the torch loader's worker writes too
                f.write(f"{name or kwargs['fileobj'].name}\n")
            return real(name, *args, **kwargs)

        return opener

    monkeypatch.setattr(tarfile, "open", logged(tarfile.open))
    for module in (shard_specs, shard_stream, tar_layout):  # fastclip's one opener of shards, where it is imported
        monkeypatch.setattr(module, "open_shard", logged(module.open_shard))
    spec = many_shards[10_000, "indexed" if counts == "indexed" else "plain"]
    extra = ["--data.train_num_samples", "10000"] if counts == "train_num_samples" else []
    cfg = parse_args(["--data.train_shards", spec, "--data.val_shards", "null", "--data.loader", kind,
                      "--data.batch_size", "8", "--data.shuffle_buffer", "8", "--data.num_threads", "1",
                      *extra])  # fmt: skip
    check_inputs(cfg)
    image = ImageSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    loader = build_loader(data=cfg.data, image=image, tokenizer=lambda texts: torch.zeros(len(texts), 77).long(),
                          train=True, rank=0, world_size=1, seed=0, device=torch.device("cpu"))  # fmt: skip
    try:
        next(iter(loader))
    finally:
        loader.close()
    opened = log.read_text(encoding="utf-8").splitlines()
    checked = cfg.data.check_shards
    if kind == "dali":
        assert len(set(opened)) == checked and len(opened) <= 4 * checked, len(opened)
    else:  # one sample a shard: the worker reads a shard per sample it buffers or prefetches (a few batches)
        assert checked < len(set(opened)) <= checked + 64, len(set(opened))
