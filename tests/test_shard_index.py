"""The index tool (`python -m fastclip.data.shards index`): every kind of bad shard and sample a web crawl leaves
named by shard and key, index files DALI and the torch loader read, and a run over the indexed set that meets
nothing it has to skip."""

import io
import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from test_data_integrity import LOADERS, _data, _ids, _image, _loader, _texts, _write_shard

from fastclip.data import shards
from fastclip.data.index import INDEX_VERSION, REPORT, SIZES, index_shards, known_counts, read_index
from fastclip.data.shards import resolve_shards
from fastclip.errors import ConfigError

from runs import ROOT, clean_env


def _jpeg(mode: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (36, 44, 4 if mode == "CMYK" else 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "CMYK" if mode == "CMYK" else "RGB").convert(mode)
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()


def _good(key: str, seed: int) -> tuple[str, dict]:
    return key, {"jpg": _image("JPEG", seed), "txt": f"caption {key}".encode(), "json": b"{}"}


def _bad_world(root):
    """A shard of each kind of trouble, and a shard of samples with it, keyed so the test can name them."""
    root.mkdir()
    _write_shard(root / "a-good.tar", [_good(f"g{i}", i) for i in range(5)])
    mixed = [
        _good("ok0", 10),
        ("nocap", {"jpg": _image("JPEG", 11)}),
        ("latin1", {"jpg": _image("JPEG", 12), "txt": "caf\xe9".encode("latin-1")}),
        ("empty_cap", {"jpg": _image("JPEG", 13), "txt": b"  \n"}),
        ("png_as_jpg", {"jpg": _image("PNG", 14), "txt": b"a png named .jpg"}),
        ("webp_as_jpg", {"jpg": _image("WEBP", 15), "txt": b"a webp named .jpg"}),
        ("gray", {"jpg": _jpeg("L", 16), "txt": b"a grayscale jpeg"}),
        ("cmyk", {"jpg": _jpeg("CMYK", 17), "txt": b"a cmyk jpeg"}),
        ("cut_jpeg", {"jpg": _image("JPEG", 18)[:-300], "txt": b"a jpeg cut short"}),
        ("not_image", {"jpg": b"<html>404</html>", "txt": b"an error page"}),
        ("gif", {"gif": _image("GIF", 19), "txt": b"a gif"}),
        _good("ok1", 20),
    ]
    _write_shard(root / "b-mixed.tar", mixed)
    whole = _write_shard(root / "c-truncated-src.tar", [_good(f"t{i}", 30 + i) for i in range(6)])
    data = whole.read_bytes()
    (root / "c-truncated.tar").write_bytes(data[: int(len(data) * 0.7)])
    whole.unlink()
    _write_shard(root / "d-empty.tar", [])
    (root / "e-zero.tar").write_bytes(b"")
    return root


ACCEPTED = {"ok0", "png_as_jpg", "webp_as_jpg", "gray", "cmyk", "ok1"}
REJECTED = {
    "nocap": "no caption",
    "latin1": "not UTF-8",
    "empty_cap": "caption is empty",
    "cut_jpeg": "JPEG cut short",
    "not_image": "not a JPEG, PNG or WebP file",
    "gif": "gif, which fastclip does not decode",
}


def _run_tool(*args, cwd=ROOT):
    cmd = [sys.executable, "-m", "fastclip.data.shards", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory):
    root = _bad_world(tmp_path_factory.mktemp("bad") / "shards")
    proc = _run_tool("index", str(root / "*.tar"), "--workers", "2", "--deep")
    return root, proc


def test_every_bad_sample_and_shard_is_named_with_what_is_wrong(indexed):
    root, proc = indexed
    assert proc.returncode == 1, proc.stderr  # two shards could not be indexed at all
    report = json.loads((root / REPORT).read_text())["shards"]
    mixed = report["b-mixed.tar"]
    assert {key for key, _ in mixed["rejected"]} == set(REJECTED)
    for key, why in mixed["rejected"]:
        assert REJECTED[key] in why, (key, why)
    assert {key for key, _ in mixed["notes"]} == {"png_as_jpg", "webp_as_jpg"}  # kept: decoded by content
    assert mixed["samples"] == len(ACCEPTED)
    truncated = report["c-truncated.tar"]  # its whole samples are kept, the one cut off is named
    assert truncated["error"] is None and truncated["samples"] >= 3
    [(key, why)] = truncated["rejected"]
    assert why.startswith("the shard ends inside it (truncated)") and key == f"(after t{truncated['samples'] - 1})"
    assert "empty tar archive" in report["d-empty.tar"]["error"]
    assert "zero-byte" in report["e-zero.tar"]["error"]
    assert "no index for" in proc.stderr and "e-zero.tar" in proc.stderr and "d-empty.tar" in proc.stderr
    assert "left out of the index: 7 samples" in proc.stdout
    sizes = json.loads((root / SIZES).read_text())
    assert sizes == {"a-good.tar": 5, "b-mixed.tar": 6, "c-truncated.tar": truncated["samples"]}
    assert not (root / "d-empty.idx").exists() and not list(root.glob(".*tmp"))  # nothing half-written
    assert [key for key, _ in read_index(str(root / "b-mixed.idx"))] == [
        "ok0", "png_as_jpg", "webp_as_jpg", "gray", "cmyk", "ok1"
    ]  # fmt: skip


@pytest.mark.parametrize("kind", LOADERS)
def test_training_on_the_indexed_set_meets_nothing_to_skip(indexed, kind, capfd, monkeypatch):
    monkeypatch.setattr(shards, "_said", set())  # each case's own log lines
    root, _ = indexed
    spec = str(root / "*.tar")
    data = _data("--data.val_shards", spec, "--data.loader", kind, "--data.max_bad_fraction", "0.5")
    loader = _loader(data, train=False, kind=kind)
    try:
        texts = [t for batch in loader for t in _texts(batch)]
        skipped = loader.skipped
    finally:
        loader.close()
    sizes = json.loads((root / SIZES).read_text())
    assert len(texts) == sum(sizes.values()) and skipped == 0
    captions = [f"caption g{i}" for i in range(5)] + [f"caption ok{i}" for i in range(2)]
    captions += ["a png named .jpg", "a webp named .jpg", "a grayscale jpeg", "a cmyk jpeg"]
    assert Counter(_ids(captions)) <= Counter(texts)
    err = capfd.readouterr().err
    assert "d-empty.tar: the index tool found it unusable" in err and "e-zero.tar" in err
    assert "skipped sample" not in err


def test_counts_come_from_the_summary_or_the_index_files(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    paths = [str(_write_shard(root / f"{i}.tar", [_good(f"k{i}{j}", j) for j in range(i + 1)])) for i in range(3)]
    assert known_counts(paths, None) is None
    index_shards(paths)
    known = known_counts(paths, None)
    assert known.source == SIZES and list(known.samples.values()) == [1, 2, 3]
    (root / SIZES).unlink()
    known = known_counts(paths, None)
    assert known.source == "index files" and list(known.samples.values()) == [1, 2, 3]
    assert (root / "0.idx").read_text().startswith(f"{INDEX_VERSION} 1\n")


def test_index_dir_for_read_only_shards_and_merged_summaries(tmp_path):
    shards, out = tmp_path / "ro", tmp_path / "idx"
    shards.mkdir()
    first = [str(_write_shard(shards / f"{i}.tar", [_good(f"k{i}", i)])) for i in range(2)]
    second = [str(_write_shard(shards / f"{i}.tar", [_good(f"k{i}", i)])) for i in range(2, 4)]
    shards.chmod(0o555)
    try:
        for part in (first, second):  # two runs into one place: the summary keeps both
            proc = _run_tool("index", *part, "--index-dir", out)
            assert proc.returncode == 0, proc.stderr
    finally:
        shards.chmod(0o755)
    assert json.loads((out / SIZES).read_text()) == {"0.tar": 1, "1.tar": 1, "2.tar": 1, "3.tar": 1}
    found = resolve_shards(str(shards / "*.tar"), field="data.train_shards", index_dir=str(out))
    assert found.samples == [1, 1, 1, 1] and found.index == [str(out / f"{i}.idx") for i in range(4)]


def test_a_shard_changed_since_it_was_indexed_is_refused(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    shard = _write_shard(root / "0.tar", [_good("a", 0)])
    index_shards([str(shard)])
    _write_shard(shard, [_good(f"k{i}", i) for i in range(6)])  # another file, past tar's 10 KiB padding
    with pytest.raises(ConfigError, match=r"0\.tar is \d+ bytes, \d+ when it was indexed.*Re-run"):
        resolve_shards(str(shard), field="data.train_shards")


def test_shards_sharing_a_name_cannot_share_an_index_dir(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        _write_shard(tmp_path / d / "0.tar", [_good("a", 0)])
    proc = _run_tool("index", tmp_path / "x/0.tar", tmp_path / "y/0.tar", "--index-dir", tmp_path / "i")
    assert proc.returncode == 2 and "would share" in proc.stderr and "--index-dir" in proc.stderr
