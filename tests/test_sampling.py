"""What an epoch is: every indexed sample once across ranks; ``data.train_num_samples`` as the epoch's length,
counting nothing; ``data.resampled`` drawing shards with replacement from the run's seed, per rank."""

import random
from collections import Counter

import pytest
import torch
from test_data_integrity import LOADERS, SPEC, TOKENIZER, _captioned_shards, _ids, _image, _texts, _write_shard

from fastclip.cli import parse_args
from fastclip.data import shard_specs, tar_layout
from fastclip.data.build import build_loaders
from fastclip.data.index import index_shards
from fastclip.data.loader import derive_seed
from fastclip.data.skips import DataBroken
from fastclip.trainer import Trainer


def _loaders(cfg, world_size):
    """Each rank's train loader, as the trainer builds them."""
    for rank in range(world_size):
        loader, _ = build_loaders(
            cfg, rank=rank, world_size=world_size, device=torch.device("cpu"), image=SPEC, tokenizer=TOKENIZER
        )
        yield rank, loader


def _args(spec, kind, *extra):
    return parse_args(["--data.train_shards", spec, "--data.val_shards", "null", "--data.loader", kind,
                       "--data.shuffle_buffer", "16", "--train.seed", "5", *extra])  # fmt: skip


@pytest.mark.parametrize("kind", LOADERS)
def test_each_epoch_every_indexed_sample_is_read_once_on_two_ranks(tmp_path, kind, capfd):
    spec, captions = _captioned_shards(tmp_path / "shards", [13, 17, 11, 19, 7, 23, 17])
    bad = ("bad", {"jpg": _image("JPEG", 99)[:-200], "txt": b"a jpeg cut short"})  # left out by the index
    _write_shard(tmp_path / "shards" / "shard-007.tar", [bad, ("k", {"jpg": _image("JPEG", 7), "txt": b"last one"})])
    captions.append("last one")
    index_shards(sorted(str(p) for p in (tmp_path / "shards").glob("*.tar")))
    cfg = _args(spec, kind, "--data.batch_size", "1", "--data.num_threads", "2")
    seen, skipped = [], 0
    for _, loader in _loaders(cfg, 2):
        try:
            assert loader.samples_per_epoch == len(captions)
            batches = iter(loader)
            seen += [t for _ in range(loader.local_samples) for t in _texts(next(batches))]
            skipped += loader.skipped
        finally:
            loader.close()
    assert Counter(seen) == Counter(_ids(captions)) and skipped == 0
    assert "skipped sample" not in capfd.readouterr().err


@pytest.mark.parametrize("kind", LOADERS)
def test_train_num_samples_is_the_epoch_and_nothing_is_counted(tmp_path, kind, monkeypatch):
    spec, _ = _captioned_shards(tmp_path / "shards", [13, 17, 11])
    walked = []
    for module in (shard_specs, tar_layout):  # a header walk would count: none may, from either module
        monkeypatch.setattr(module, "walk", lambda path: walked.append(path))
    cfg = _args(spec, kind, "--data.batch_size", "4", "--data.train_num_samples", "30", "--train.epochs", "2")
    [(_, loader)] = list(_loaders(cfg, 1))
    try:
        assert loader.samples_per_epoch == 30
        batches = iter(loader)
        texts = [t for _ in range(20) for t in _texts(next(batches))]  # 80 samples: the stream goes on past 41
    finally:
        loader.close()
    assert walked == [] and len(texts) == 80
    assert len(set(texts)) == 41  # each pass over the shards reads every sample


def test_train_num_samples_sets_the_schedules_epoch(single_rank, world_dir, tmp_path):
    from runs import small_run_args

    args = small_run_args(world_dir, tmp_path, steps=0) + ["--data.train_num_samples", "100", "--train.epochs", "3"]
    trainer = Trainer(parse_args(args), single_rank)
    trainer.close()
    assert (trainer.steps_per_epoch, trainer.total_steps) == (100 // 16, 3 * (100 // 16))
    assert trainer.train_loader.epoch_from == "data.train_num_samples"


def _shard_of(sample_text: str) -> int:
    return int(sample_text.split()[1])  # 'sample S I'


def test_torch_resampled_draws_shards_from_the_seed_per_rank_and_worker(tmp_path):
    spec, captions = _captioned_shards(tmp_path / "shards", [3, 5, 4, 6])
    by_ids = dict(zip(_ids(captions), captions))
    cfg = _args(spec, "torch", "--data.batch_size", "1", "--data.num_threads", "1", "--data.shuffle_buffer", "1",
                "--data.resampled", "true", "--data.train_num_samples", "18")  # fmt: skip
    sizes, paths = [3, 5, 4, 6], sorted((tmp_path / "shards").glob("*.tar"))
    for rank, loader in _loaders(cfg, 2):
        try:
            batches = iter(loader)
            read = [_shard_of(by_ids[_texts(next(batches))[0]]) for _ in range(60)]
        finally:
            loader.close()
        rng = random.Random(derive_seed(5, "shard draws", rank, 0))  # the rank's one worker
        expected = []
        while len(expected) < 60:  # each drawn shard read whole, in order (a shuffle buffer of 1)
            drawn = rng.choice(range(len(paths)))
            expected += [drawn] * sizes[drawn]
        assert read == expected[:60], rank
    assert len(set(read)) > 1


def test_dali_resampled_reads_its_ranks_draw(tmp_path):
    from fastclip.data.dali import _reader_shards

    spec, captions = _captioned_shards(tmp_path / "shards", [3, 5, 4, 6, 2, 7])
    found = shard_specs.resolve_shards(spec, field="data.train_shards")
    draws = {}
    for rank in range(2):
        paths, _ = _reader_shards(found, field="data.train_shards", resampled=True, seed=5, rank=rank)
        expected = random.Random(derive_seed(5, "shard draws", rank)).choices(range(6), k=6)
        assert paths == [found.paths[i] for i in expected]
        draws[rank] = paths
    assert draws[0] != draws[1]  # each rank its own draw
    by_ids = dict(zip(_ids(captions), captions))
    cfg = _args(spec, "dali", "--data.batch_size", "2", "--data.resampled", "true", "--data.train_num_samples", "20")
    [(_, loader)] = list(_loaders(cfg, 1))
    try:
        batches = iter(loader)
        read = Counter(_shard_of(by_ids[t]) for _ in range(20) for t in _texts(next(batches)))
    finally:
        loader.close()
    drawn = set(random.Random(derive_seed(5, "shard draws", 0)).choices(range(6), k=6))
    assert set(read) <= drawn and loader.samples_per_epoch == 20


def test_resampled_needs_train_num_samples():
    with pytest.raises(Exception, match="data.resampled.*set data.train_num_samples"):
        parse_args(["--data.resampled", "true"])


def test_a_shard_missing_when_first_read_is_skipped_and_named(tmp_path, warnings_log, monkeypatch):
    monkeypatch.setattr(shard_specs, "_said", set())
    spec, _ = _captioned_shards(tmp_path / "shards", [5] * 6)
    cfg = _args(spec, "torch", "--data.batch_size", "2", "--data.num_threads", "1", "--data.check_shards", "2",
                "--data.train_num_samples", "30", "--data.max_bad_fraction", "0.2")  # fmt: skip
    middle = tmp_path / "shards" / "shard-002.tar"
    with open(middle, "r+b") as f:  # the start-up check opens the first and the last only
        f.truncate(700)
    [(_, loader)] = list(_loaders(cfg, 1))
    try:
        batches = iter(loader)
        texts = [t for _ in range(20) for t in _texts(next(batches))]
    finally:
        loader.close()
    assert len(texts) == 40
    err = warnings_log()
    assert "skipped shard" in err and "shard-002.tar" in err and "1 of 6 shards skipped" in err
    with open(tmp_path / "shards" / "shard-003.tar", "r+b") as f:
        f.truncate(0)
    [(_, loader)] = list(_loaders(cfg, 1))
    try:
        batches = iter(loader)
        with pytest.raises(
            DataBroken,
            match=r"2 of the \d shards this loader worker has read are unreadable .*, more than data.max_bad_fraction",
        ):
            for _ in range(40):
                next(batches)
    finally:
        loader.close()


@pytest.mark.parametrize("counted", [True, False])
def test_the_slots_of_two_ranks_and_two_workers_partition_every_epoch(tmp_path, counted):
    from fastclip.data.shard_stream import Shard, ShardStream

    sizes = [13, 17, 11, 19, 7, 23, 17, 5, 9]
    stream = ShardStream(
        shards=[Shard(f"{i}.tar", n if counted else None, None) for i, n in enumerate(sizes)], train=True, rank=0,
        world_size=2, seed=5, shuffle_buffer=1, transform=None, skips=None, bad=None,
    )  # fmt: skip
    for epoch in range(3):
        read = Counter()
        shares = []
        for slot in range(4):
            ranges = stream.share(epoch, slot, 4)
            for shard, start, stop in ranges:
                n = sizes[int(shard.path.split(".")[0])]
                read.update((shard.path, i) for i in range(start, n if stop is None else stop))
            shares.append(sum((stop or shard.samples or sizes[int(shard.path[0])]) - start for shard, start, stop in
                              ranges))  # fmt: skip
        assert read == Counter((f"{i}.tar", j) for i, n in enumerate(sizes) for j in range(n)), epoch
        if counted:  # a run of the order each, the first ones a sample more
            assert shares == sorted(shares, reverse=True) and shares[0] - shares[-1] <= 1


def test_a_few_bad_shards_among_many_do_not_stop_a_worker_too_many_do():
    from fastclip.data.shard_stream import BadShards

    bad = BadShards(0.01, shards=1000)
    bad.check("s0", OSError("gone"))  # one of the first shards a worker reads: 1 of 1, but too early to judge
    for i in range(1, 300):
        bad.check(f"s{i}", OSError("gone") if i == 250 else None)  # 2 of 300, never past 1% once 100 are read
    bad.check("s300", OSError("gone"))  # 3 of 301: still within 1%
    with pytest.raises(DataBroken, match=r"4 of the 302 shards .*s301: gone"):
        bad.check("s301", OSError("gone"))
