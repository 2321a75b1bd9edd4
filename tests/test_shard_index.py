"""The index tool (`python -m fastclip.data.shards index`): every kind of bad shard and sample a web crawl leaves
named by shard and key, index files DALI and the torch loader read, and a run over the indexed set that meets
nothing it has to skip."""

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_integrity import LOADERS, _data, _ids, _image, _loader, _texts, _write_shard

from fastclip.data import shard_specs
from fastclip.data.index import INDEX_VERSION, REPORT, SIZES, index_shards, known_counts, place_of, read_index
from fastclip.data.shard_specs import resolve_shards
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
    report = json.loads((root / REPORT).read_text())["shards"]  # counts, which start-up reads
    mixed = json.loads((root / "b-mixed.report.json").read_text())  # the samples left out, by key
    assert {key for key, _ in mixed["rejected"]} == set(REJECTED)
    for key, why in mixed["rejected"]:
        assert REJECTED[key] in why, (key, why)
    assert {key for key, _ in mixed["notes"]} == {"png_as_jpg", "webp_as_jpg"}  # kept: decoded by content
    assert report["b-mixed.tar"]["samples"] == len(ACCEPTED) and report["b-mixed.tar"]["left_out"] == len(REJECTED)
    assert not (root / "a-good.report.json").exists()  # nothing to say
    truncated = report["c-truncated.tar"]  # its whole samples are kept, the one cut off is named
    assert truncated["error"] is None and truncated["samples"] >= 3
    [(key, why)] = json.loads((root / "c-truncated.report.json").read_text())["rejected"]
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
    monkeypatch.setattr(shard_specs, "_said", set())  # each case's own log lines
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
    assert known_counts(paths, None).missing == paths
    index_shards(paths)
    known = known_counts(paths, None)
    assert known.samples == dict(zip(paths, [1, 2, 3])) and not known.missing
    assert (root / "0.idx").read_text().startswith(f"{INDEX_VERSION} 1\n")
    (root / SIZES).unlink()  # this tool's index files still count
    assert known_counts(paths, None).samples == dict(zip(paths, [1, 2, 3]))
    (root / REPORT).unlink()  # index files alone, as DALI's wds2idx writes them (every sample): not counts
    assert known_counts(paths, None).missing == paths


def test_index_dir_for_read_only_shards_and_merged_summaries(tmp_path):
    shards, out = tmp_path / "ro", tmp_path / "idx"
    shards.mkdir()
    first = [str(_write_shard(shards / f"{i}.tar", [_good(f"k{i}", i)])) for i in range(2)]
    second = [str(_write_shard(shards / f"{i}.tar", [_good(f"k{i}", i)])) for i in range(2, 4)]
    listing = sorted(p.name for p in shards.iterdir())
    shards.chmod(0o555)  # (root writes anyway: the listing below says nothing was)
    try:
        for part in (first, second):  # two runs into one place: the summary keeps both
            proc = _run_tool("index", *part, "--index-dir", out)
            assert proc.returncode == 0, proc.stderr
    finally:
        shards.chmod(0o755)
    assert sorted(p.name for p in shards.iterdir()) == listing
    place = Path(place_of(first[0], str(out)))
    assert place.parent == out and json.loads((place / SIZES).read_text()) == {f"{i}.tar": 1 for i in range(4)}
    found = resolve_shards(str(shards / "*.tar"), field="data.train_shards", index_dir=str(out))
    assert found.samples == [1, 1, 1, 1] and found.index == [f"{place}/{i}.idx" for i in range(4)]


def test_a_shard_changed_since_it_was_indexed_is_refused(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    shard = _write_shard(root / "0.tar", [_good("a", 0)])
    index_shards([str(shard)])
    _write_shard(shard, [_good(f"k{i}", i) for i in range(6)])  # another file, past tar's 10 KiB padding
    with pytest.raises(ConfigError, match=r"0\.tar is \d+ bytes, \d+ when it was indexed.*Re-run"):
        resolve_shards(str(shard), field="data.train_shards")


def test_sets_whose_shards_share_names_share_an_index_dir(tmp_path):
    """img2dataset names every set's shards 00000.tar: a train and a val set indexed into one folder must not clash."""
    for d, n in (("train", 1), ("val", 2)):
        (tmp_path / d).mkdir()
        _write_shard(tmp_path / d / "0.tar", [_good(f"{d}{i}", i) for i in range(n)])
    for d in ("train", "val"):
        proc = _run_tool("index", tmp_path / d / "0.tar", "--index-dir", tmp_path / "i")
        assert proc.returncode == 0, proc.stderr
    for d, n in (("train", 1), ("val", 2)):
        found = resolve_shards(str(tmp_path / d / "0.tar"), field="data.val_shards", index_dir=str(tmp_path / "i"))
        assert found.samples == [n]
    proc = _run_tool("index", tmp_path / "train", tmp_path / "nothere.tar")  # a folder, a missing shard: not damage
    assert proc.returncode == 2 and "is a folder" in proc.stderr and not (tmp_path / SIZES).exists()


def test_index_files_of_another_tool_are_read_but_do_not_count(tmp_path, monkeypatch):
    """DALI's own wds2idx lists every sample, one without a caption too: the torch loader passes over it, and the
    counts come from elsewhere (here a header walk)."""
    from wds2idx import IndexCreator

    root = tmp_path / "s"
    root.mkdir()
    shard = _write_shard(root / "0.tar", [_good("a", 0), ("nocap", {"jpg": _image("JPEG", 1)}), _good("b", 2)])
    monkeypatch.chdir(tmp_path)
    with IndexCreator(str(shard), str(root / "0.idx"), verbose=False) as creator:
        creator.create_index()
    assert (root / "0.idx").read_text().startswith("v1.2 3\n")
    found = resolve_shards(str(shard), field="data.val_shards", count=True)
    assert found.samples == [2] and found.index == [str(root / "0.idx")]
    loader = _loader(_data("--data.val_shards", str(shard), "--data.loader", "torch"), train=False, kind="torch")
    try:
        texts = [t for batch in loader for t in _texts(batch)]
    finally:
        loader.close()
    assert Counter(texts) == Counter(_ids(["caption a", "caption b"]))


def test_summaries_that_are_not_json_are_named(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    shard = _write_shard(root / "0.tar", [_good("a", 0)])
    (root / SIZES).write_text('{"0.tar": 1,')
    with pytest.raises(ConfigError, match=r"sizes\.json is not valid JSON .*re-run the index tool"):
        resolve_shards(str(shard), field="data.train_shards")


def test_an_index_dir_that_is_not_a_folder_is_refused(tmp_path):
    shard = _write_shard(tmp_path / "0.tar", [_good("a", 0)])
    with pytest.raises(ConfigError, match=r"data\.index_dir: .*nowhere' is not a folder"):
        resolve_shards(str(shard), field="data.train_shards", index_dir=str(tmp_path / "nowhere"))


def test_a_jpeg_with_data_after_its_end_marker_is_kept(tmp_path):
    shard = _write_shard(tmp_path / "0.tar", [("motion", {"jpg": _image("JPEG", 0) + b"\x01" * 4096, "txt": b"x"})])
    [found] = index_shards([str(shard)])
    [(key, note)] = json.loads((tmp_path / "0.report.json").read_text())["notes"]
    assert found.count == 1 and key == "motion" and "it decodes, kept" in note


@pytest.mark.parametrize("check", [1, 2, 64])
def test_start_up_opens_only_check_shards(tmp_path, monkeypatch, check):
    root = tmp_path / "s"
    root.mkdir()
    paths = [str(_write_shard(root / f"{i:02d}.tar", [_good(f"k{i}", i)])) for i in range(10)]
    index_shards(paths)
    opened = []
    real = shard_specs._check_opens
    monkeypatch.setattr(shard_specs, "_check_opens", lambda path, **kw: opened.append(path) or real(path, **kw))
    found = resolve_shards(str(root / "*.tar"), field="data.train_shards", check=check, count=True)
    assert found.samples == [1] * 10
    assert opened == (paths[:1] if check == 1 else [paths[0], paths[-1]] if check == 2 else paths)


def test_dali_reads_an_index_dir_and_stops_on_a_shard_truncated_since(tmp_path):
    from fastclip.data.skips import DataBroken

    root, out = tmp_path / "s", tmp_path / "idx"
    root.mkdir()
    paths = [str(_write_shard(root / f"{i}.tar", [_good(f"k{i}{j}", j) for j in range(4)])) for i in range(4)]
    index_shards(paths, index_dir=str(out))
    spec = str(root / "*.tar")
    data = _data("--data.val_shards", spec, "--data.loader", "dali", "--data.index_dir", str(out))
    loader = _loader(data, train=False, kind="dali")
    try:
        assert sum(len(_texts(b)) for b in loader) == 16
    finally:
        loader.close()
    with open(paths[1], "r+b") as f:  # after start-up would have looked (it opens the first and the last)
        f.truncate(4096)
    data = _data("--data.train_shards", spec, "--data.loader", "dali", "--data.index_dir", str(out),
                 "--data.batch_size", "4", "--data.check_shards", "2")  # fmt: skip
    loader = _loader(data, train=True, kind="dali")
    try:
        with pytest.raises(DataBroken, match=r"the DALI reader stopped on .*1\.idx.*Re-index it"):
            batches = iter(loader)
            for _ in range(20):
                next(batches)
    finally:
        loader.close()


def test_index_files_are_readable_by_the_sets_other_users(tmp_path):
    shard = _write_shard(tmp_path / "0.tar", [_good("a", 0)])
    index_shards([str(shard)])
    for name in ("0.idx", SIZES, REPORT):  # with the usual umask 022: rw-r--r--
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~index_umask(), name


def index_umask() -> int:
    from fastclip.data import index

    return index._UMASK


def test_start_up_says_where_the_counts_came_from(tmp_path):
    root = tmp_path / "s"
    root.mkdir()
    paths = [str(_write_shard(root / f"{i}.tar", [_good(f"k{i}", i)])) for i in range(3)]
    index_shards(paths[:2])
    found = resolve_shards(str(root / "*.tar"), field="data.train_shards", count=True)
    assert found.samples == [1, 1, 1]
    assert found.counted_from == "the index tool's counts (2 shards) and their tar headers (1 shard)"


def test_a_gzipped_shard_is_named_as_one(tmp_path):
    import gzip

    plain = _write_shard(tmp_path / "plain.tar", [_good("a", 0)])
    (tmp_path / "0.tar").write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(ConfigError, match=r"0\.tar' is gzip-compressed: .*gunzip it"):
        resolve_shards(str(tmp_path / "0.tar"), field="data.train_shards")
    [found] = index_shards([str(tmp_path / "0.tar")])
    assert found.error.startswith("gzip-compressed: gunzip it")
