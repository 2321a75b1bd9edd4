"""The synthetic world and the DALI loaders over it."""

import io
import json
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fastclip.cli import parse_args
from fastclip.data.batch import STREAMS_VERSION
from fastclip.data.build import build_loader
from fastclip.data.synthetic import COLOURS, SHAPES, class_names
from fastclip.data.tokenizer import build_tokenizer
from fastclip.model import ImageSpec

from runs import NEEDS_DALI

SPEC = ImageSpec(size=32, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711))


def _samples(tar_path):
    with tarfile.open(tar_path) as tar:
        files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted({name.rsplit(".", 1)[0] for name in files})
    return [{ext: files[f"{k}.{ext}"] for ext in ("jpg", "txt", "json", "cls")} for k in keys]


def test_world_is_consistent_and_reused(world_dir):
    from fastclip.data.synthetic import WorldSpec, generate

    shards = sorted((world_dir / "train").glob("*.tar"))
    assert len(shards) == 4 and len(sorted((world_dir / "val").glob("*.tar"))) == 1
    samples = _samples(shards[0])
    assert len(samples) == 128
    names = json.loads((world_dir / "classnames.json").read_text())
    assert names == class_names() and len(names) == len(COLOURS) * len(SHAPES)
    for s in samples[:20]:
        meta = json.loads(s["json"])
        caption = s["txt"].decode()
        assert meta["shape"] in caption and meta["colour"] in caption
        assert names[int(s["cls"])] == f"{meta['colour']} {meta['shape']}"
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.format == "JPEG" and img.size == (48, 48)
    assert len({s["txt"] for s in samples}) > 30  # varied captions
    before = shards[0].stat().st_mtime_ns
    generate(world_dir, WorldSpec(train_samples=512, val_samples=100, samples_per_shard=128, image_size=48, seed=3))
    assert shards[0].stat().st_mtime_ns == before  # same spec: nothing rewritten


LOADERS = ["dali", "torch"]


def _loader(world_dir, *, train, rank=0, world_size=1, batch=16, kind="dali"):
    data = parse_args(
        [
            "--data.train_shards", str(world_dir / "train" / "*.tar"),
            "--data.val_shards", str(world_dir / "val" / "*.tar"),
            "--data.batch_size", str(batch),
            "--data.shuffle_buffer", "64",
            "--data.loader", kind,
        ]
    ).data  # fmt: skip
    tok = build_tokenizer("fastclip-tiny")
    return build_loader(
        data=data, image=SPEC, tokenizer=tok, train=train, rank=rank, world_size=world_size, seed=1,
        device=torch.device("cpu"),
    )  # fmt: skip


@pytest.mark.parametrize("kind", LOADERS)
def test_train_batches_are_normalized_and_tokenized_as_open_clip(world_dir, kind):
    import open_clip

    loader = _loader(world_dir, train=True, kind=kind)
    try:
        assert loader.samples_per_epoch == 512
        it = iter(loader)
        batch = next(it)
        assert batch.images.shape == (16, 3, 32, 32) and batch.images.dtype == torch.float32
        assert -3 < batch.images.mean() < 3 and batch.images.std() > 0.2
        assert batch.texts.shape == (16, 32) and batch.texts.dtype == torch.long
        # token ids decode back to captions of the world
        decoded = [open_clip.decode(t).replace("<start_of_text>", "").split("<end_of_text>")[0] for t in batch.texts]
        assert all(any(shape in d for shape in SHAPES) for d in decoded)
        for _ in range(40):  # past the end of the epoch: a training loader wraps around
            next(it)
    finally:
        loader.close()


def _val_pass(world_dir, rank, world_size, kind):
    loader = _loader(world_dir, train=False, rank=rank, world_size=world_size, batch=16, kind=kind)
    try:
        texts, labels = [], []
        for batch in loader:
            texts.extend(tuple(t.tolist()) for t in batch.texts)
            labels.extend(batch.labels.tolist())
        return texts, labels
    finally:
        loader.close()


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_val_split_covers_every_sample_once(world_dir, world_size, kind):
    whole_texts, whole_labels = _val_pass(world_dir, 0, 1, kind)
    assert len(whole_texts) == 100 and min(whole_labels) >= 0
    texts, labels = [], []
    for rank in range(world_size):
        t, lab = _val_pass(world_dir, rank, world_size, kind)
        texts += t
        labels += lab
    assert Counter(texts) == Counter(whole_texts) and Counter(labels) == Counter(whole_labels)
    loader = _loader(world_dir, train=False, batch=16, kind=kind)
    try:
        passes = [[tuple(t.tolist()) for batch in loader for t in batch.texts] for _ in range(2)]
    finally:
        loader.close()
    assert passes[0] == passes[1] == whole_texts  # each eval pass sees the same samples in the same order
    assert np.bincount(whole_labels).max() < 100  # several classes present


def _rewrite(src, dst, drop):
    """Copy tar ``src`` to ``dst`` without the members for which ``drop(name)`` is true."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            if not drop(member.name):
                tout.addfile(member, tin.extractfile(member))


@pytest.mark.parametrize("kind", LOADERS)
def test_samples_without_caption_are_skipped_and_unlabelled_val_still_evaluates(world_dir, tmp_path, kind):
    src = sorted((world_dir / "train").glob("*.tar"))[0]
    holed = tmp_path / "holed-000.tar"
    no_caption = {f"train{i:08d}.txt" for i in range(0, 128, 8)}  # 16 of 128 samples lose their caption
    _rewrite(src, holed, lambda name: name in no_caption)
    unlabelled = tmp_path / "unlabelled-000.tar"
    _rewrite(world_dir / "val" / "shard-000000.tar", unlabelled, lambda name: name.endswith(".cls"))
    data = parse_args(
        [
            "--data.train_shards",
            str(holed),
            "--data.val_shards",
            str(unlabelled),
            "--data.batch_size",
            "16",
            "--data.loader",
            kind,
        ]
    ).data
    tok = build_tokenizer("fastclip-tiny")
    common = dict(data=data, image=SPEC, tokenizer=tok, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    train = build_loader(train=True, **common)
    try:
        assert train.samples_per_epoch == 112
        batches = iter(train)
        seen = [tuple(t.tolist()) for _ in range(14) for t in next(batches).texts]
        assert all(t[1] != tok([""])[0, 1].item() for t in seen)  # no empty caption reached the model
    finally:
        train.close()
    val = build_loader(train=False, **common)
    try:
        batches = list(val)
        assert sum(b.images.shape[0] for b in batches) == 100 and all((b.labels == -1).all() for b in batches)
    finally:
        val.close()


def _corrupt_copy(src, dst, victim):
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for member in tin:
            data = tin.extractfile(member).read()
            if member.name == victim:
                data = data[:200] + b"not a jpeg any more" * 20
                member.size = len(data)
            tout.addfile(member, io.BytesIO(data))


def test_corrupt_jpeg_is_skipped_and_logged_by_the_torch_loader(world_dir, tmp_path, capfd):
    shard = tmp_path / "corrupt-000.tar"
    _corrupt_copy(world_dir / "val" / "shard-000000.tar", shard, "val00000005.jpg")
    data = parse_args(["--data.val_shards", str(shard), "--data.batch_size", "16", "--data.loader", "torch"]).data
    common = dict(data=data, image=SPEC, tokenizer=build_tokenizer("fastclip-tiny"), rank=0, world_size=1, seed=0)
    loader = build_loader(train=False, device=torch.device("cpu"), **common)
    seen = sum(b.images.shape[0] for b in loader)
    assert seen == 99  # 100 samples, one dropped
    log = capfd.readouterr().err  # the loader's worker processes log to stderr
    assert "val00000005" in log and "corrupt-000.tar" in log and "1 skipped" in log


def test_corrupt_jpeg_is_skipped_and_logged_by_dali(world_dir, tmp_path, capfd):
    shard = tmp_path / "corrupt-000.tar"
    _corrupt_copy(world_dir / "val" / "shard-000000.tar", shard, "val00000005.jpg")
    args = ["--data.train_shards", str(shard), "--data.val_shards", str(shard), "--data.batch_size", "16"]
    data = parse_args([*args, "--data.loader", "dali", "--data.shuffle_buffer", "8"]).data
    tok = build_tokenizer("fastclip-tiny")
    common = dict(data=data, image=SPEC, tokenizer=tok, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    whole = {
        tuple(t.tolist()) for t in tok([s["txt"].decode() for s in _samples(world_dir / "val" / "shard-000000.tar")])
    }
    (bad_caption,) = [
        tuple(t.tolist()) for t in tok([s["txt"].decode() for s in _samples(shard) if not _decodes(s["jpg"])])
    ]
    val = build_loader(train=False, **common)
    try:
        for _ in range(2):  # every pass: the 99 good samples, once each, the corrupt one never
            texts = [tuple(t.tolist()) for b in val for t in b.texts]
            assert len(texts) == 99 and set(texts) == whole - {bad_caption}
        assert val.skipped == 2
    finally:
        val.close()
    train = build_loader(train=True, **common)
    try:
        batches = iter(train)
        sizes = [next(batches).images.shape[0] for _ in range(20)]  # 320 samples: three passes over the shard
        assert sizes == [16] * 20  # a skip never shortens a training batch
        assert train.skipped >= 2
    finally:
        train.close()
    log = capfd.readouterr().err
    assert "skipped sample val00000005 in shard" in log and "corrupt-000.tar" in log and "on rank 0" in log


def _decodes(jpeg: bytes) -> bool:
    try:
        Image.open(io.BytesIO(jpeg)).load()
        return True
    except OSError:
        return False


def test_torch_train_stream_restores_its_position(world_dir):
    texts = lambda b: [tuple(t.tolist()) for t in b.texts]  # noqa: E731
    first = _loader(world_dir, train=True, kind="torch")
    try:
        it = iter(first)
        batches = [next(it) for _ in range(40)]  # past the 32 batches of an epoch
    finally:
        first.close()
    for k in (0, 4, 33):
        again = _loader(world_dir, train=True, kind="torch")
        try:
            again.restore(batches[k].position.state())
            it = iter(again)
            assert [texts(next(it)) for _ in range(3)] == [texts(b) for b in batches[k + 1 : k + 4]], k
        finally:
            again.close()
    with pytest.raises(ValueError, match="saved by the dali loader"):
        _loader(world_dir, train=True, kind="torch").restore({"loader": "dali"})


def test_dali_train_stream_restores_its_position(world_dir):
    texts = lambda b: [tuple(t.tolist()) for t in b.texts]  # noqa: E731
    first = _loader(world_dir, train=True)
    try:
        it = iter(first)
        batches = [next(it) for _ in range(40)]  # 640 samples: across an epoch boundary (512)
    finally:
        first.close()
    for k, consumed in ((2, None), (30, None), (5, 5)):  # after whole batches, and mid-read
        position = batches[k].position
        if consumed is not None:
            position = type(position)(position.reader, consumed)
        again = _loader(world_dir, train=True)
        try:
            again.restore(position.state())
            it = iter(again)
            got = [texts(next(it)) for _ in range(3)]
        finally:
            again.close()
        if consumed is None:
            assert got == [texts(b) for b in batches[k + 1 : k + 4]]
        else:  # the read of batch k, from its 6th sample on, then the next read
            assert got[0] == texts(batches[k])[5:] + texts(batches[k + 1])[:5]


def test_refill_keeps_training_batches_full_and_in_order():
    from fastclip.data.torch_loader import _Refill

    refill, out, start = _Refill(4), [], 0
    for n in (4, 3, 4, 4, 2, 4, 1):  # batches after dropped samples: some short
        ids = torch.arange(start, start + n)
        start += n
        out += [batch for batch in refill.push(ids.float(), ids * 10, ids)]
    assert all(len(b[0]) == 4 for b in out) and len(out) == 5  # 22 samples: 5 full batches, 2 held back
    assert torch.cat([b[2] for b in out]).tolist() == list(range(20))  # every sample once, in order
    assert all(torch.equal(b[1], b[2] * 10) and torch.equal(b[0], b[2].float()) for b in out)


def test_gpu_decode_batches_travel_as_one_tensor_of_bytes():
    """The torch loader's GPU-decode batches cross from worker to main process as one bytes tensor and its offsets
    (a file descriptor each), not one tensor per sample; unpacked, every JPEG's bytes and every decoded image are
    back in place."""
    import pickle

    from fastclip.data.torch_loader import _collate
    from fastclip.data.workers import PackedImages

    g = torch.Generator().manual_seed(0)
    jpegs = [torch.randint(0, 256, (int(n),), dtype=torch.uint8, generator=g) for n in (300, 17, 4096, 5)]
    png = torch.randint(0, 256, (3, 8, 6), dtype=torch.uint8, generator=g)  # decoded in the worker
    images = [jpegs[0], jpegs[1], png, jpegs[2], jpegs[3]]
    items = [(im, torch.zeros(77, dtype=torch.long), 1, f"s:{i}", 10 + i) for i, im in enumerate(images)]
    packed, texts, labels, sources, read = _collate(items)
    assert read == 10 + len(images) - 1  # the worker's count after the batch's last sample
    assert isinstance(packed, PackedImages) and packed.data.numel() == sum(j.numel() for j in jpegs)
    tensors = [t for t in pickle.loads(pickle.dumps(packed)) if isinstance(t, torch.Tensor)]
    assert len(tensors) == 2 and list(packed.decoded) == [2]
    got = packed.unpack()
    assert len(got) == 5 and all(torch.equal(a, b) for a, b in zip(got, images))
    assert got[0].data_ptr() == packed.data.data_ptr()  # a view, not a copy
    assert texts.shape == (5, 77) and labels.tolist() == [1] * 5 and sources[2] == "s:2"


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["torch", pytest.param("dali", marks=NEEDS_DALI)])
def test_corrupt_jpeg_on_the_gpu_decode_is_dropped_and_batches_stay_full(world_dir, tmp_path, capfd, kind):
    shard = tmp_path / "corrupt-000.tar"
    _corrupt_copy(world_dir / "val" / "shard-000000.tar", shard, "val00000005.jpg")
    args = ["--data.train_shards", str(shard), "--data.val_shards", str(shard), "--data.batch_size", "16"]
    data = parse_args([*args, "--data.loader", kind, "--data.num_threads", "1"]).data
    common = dict(data=data, image=SPEC, tokenizer=build_tokenizer("fastclip-tiny"), rank=0, world_size=1, seed=0)
    val = build_loader(train=False, device=torch.device("cuda"), **common)
    assert sum(b.images.shape[0] for b in val) == 99
    train = build_loader(train=True, device=torch.device("cuda"), **common)
    try:
        batches = iter(train)
        for _ in range(14):  # two passes over the shard
            batch = next(batches)
            assert batch.images.shape[0] == batch.texts.shape[0] == 16 and batch.images.is_cuda
        assert train.skipped >= 1  # the refill that kept them full: test_refill_keeps_training_batches_full...
    finally:
        train.close()
    log = capfd.readouterr().err
    assert "skipped sample val00000005 in shard" in log and "corrupt-000.tar" in log


@pytest.mark.parametrize("kind", LOADERS)
def test_a_position_from_another_seed_scheme_starts_afresh(world_dir, kind):
    loader = _loader(world_dir, train=True, kind=kind)
    try:
        saved = next(iter(loader)).position.state()
        assert saved["streams"] == STREAMS_VERSION == 3
        for older in ({k: v for k, v in saved.items() if k != "streams"}, {**saved, "streams": 2}):  # earlier ones
            with pytest.raises(ValueError, match="data streams were seeded otherwise"):
                loader.restore(older)
    finally:
        loader.close()
