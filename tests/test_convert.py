"""fastclip.data.convert: webdataset shards from an open_clip CSV or a folder of images (tiny PIL images in
tmp_path; no shard is indexed unless a test says so)."""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from fastclip.data import convert, convert_rows, shard_writer, shards
from fastclip.data.convert import ConvertResult, convert_csv, convert_folder
from fastclip.data.tar_layout import member_groups, usable
from fastclip.errors import ConfigError


def image(path: Path, fmt: str = "JPEG", colour=(200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), colour).save(path, format=fmt)
    return path


def write_csv(path: Path, rows: list[tuple[str, str]], *, sep: str = "\t", header=("filepath", "title")) -> Path:
    def cell(text: str) -> str:
        return f'"{text}"' if sep in text else text

    path.write_text("\n".join(sep.join(cell(c) for c in row) for row in [header, *rows]) + "\n", encoding="utf-8")
    return path


def samples(result: ConvertResult) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of the shards, read back with tarfile and grouped as fastclip groups them."""
    found = []
    for shard in result.shards:
        with tarfile.open(shard) as tar:
            for key, group in member_groups(tar):
                assert usable(group), (shard, key, sorted(group))
                found.append((key, {ext: tar.extractfile(m).read() for ext, m in group.items()}))
    return found


def meta(sample) -> dict:
    return json.loads(sample[1]["json"])


def tars(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.tar"))


def test_csv_tab_separated_with_bad_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are read from the current directory, as open_clip reads them
    image(tmp_path / "img/a.jpg")
    image(tmp_path / "img/b.png", "PNG")
    image(tmp_path / "img/c.JPEG")
    image(tmp_path / "img/d.webp", "WEBP")
    image(tmp_path / "img/e.gif", "GIF")
    image(tmp_path / "img/f.jpg")
    (tmp_path / "img/g.jpg").write_bytes(image(tmp_path / "g.jpg").read_bytes()[:-40])  # cut short
    (tmp_path / "img/h.jpg").write_bytes(b"<html>not found</html>")
    rows = [
        ("img/a.jpg", "a red square, 1\t2"),  # a tab inside a quoted field
        ("img/b.png", "NA"),  # pandas' defaults read this as NaN; it is a caption
        ("img/missing.jpg", "gone"),
        ("img/c.JPEG", "007"),
        ("img/d.webp", "  padded  "),
        ("img/e.gif", "a gif"),
        ("img/f.jpg", ""),
        ("img/g.jpg", "truncated"),
        ("img/h.jpg", "an error page"),
        ("", "no image"),
    ]
    result = convert_csv(write_csv(tmp_path / "train.csv", rows), "out", workers=2, index=False)

    got = samples(result)
    assert [k for k, _ in got] == ["000000000", "000000001", "000000002", "000000003"]
    assert [sorted(g) for _, g in got] == [["jpg", "json", "txt"], ["json", "png", "txt"], ["jpg", "json", "txt"],
                                           ["json", "txt", "webp"]]  # fmt: skip
    assert [g["txt"].decode() for _, g in got] == ["a red square, 1\t2", "NA", "007", "padded"]
    assert meta(got[1]) == {"key": "000000001", "source": "img/b.png", "row": 2, "caption": "NA"}
    assert got[0][1]["jpg"] == (tmp_path / "img/a.jpg").read_bytes()  # the bytes as they are, not re-encoded
    assert result.written == 4 and result.rows == 10
    assert result.skipped_by_reason() == {
        convert_rows.IMAGE_NOT_FOUND: 1, convert_rows.OTHER_FORMAT: 1, convert_rows.EMPTY_CAPTION: 1,
        convert_rows.DAMAGED_IMAGE: 1, convert_rows.NOT_AN_IMAGE: 1, convert_rows.NO_IMAGE_PATH: 1,
    }  # fmt: skip
    report = json.loads(convert.report_path(tmp_path / "out", "shard").read_text())
    assert [(s["row"], s["reason"]) for s in report["skipped"]] == [
        (3, convert_rows.IMAGE_NOT_FOUND), (6, convert_rows.OTHER_FORMAT), (7, convert_rows.EMPTY_CAPTION),
        (8, convert_rows.DAMAGED_IMAGE), (9, convert_rows.NOT_AN_IMAGE), (10, convert_rows.NO_IMAGE_PATH),
    ]  # fmt: skip
    assert "--reencode" in report["skipped"][1]["detail"] and "GIF" in report["skipped"][1]["detail"]
    assert report["shards"] == {"shard-000000.tar": 4}
    summary = result.summary()
    assert (
        "wrote 4 samples in 1 shard to" in summary
        and "skipped 6 of 10 rows" in summary
        and "1 image not found" in summary
    )


def test_csv_comma_custom_columns_and_root(tmp_path, monkeypatch):
    data = tmp_path / "data"
    for name in ("x.jpg", "y.jpg"):
        image(data / "pics" / name)
    csv = write_csv(tmp_path / "list.csv", [("pics/x.jpg", "one, two"), ("pics/y.jpg", "three")], sep=",",
                    header=("path", "caption"))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    result = convert_csv(csv, tmp_path / "out", separator=",", image_key="path", caption_key="caption", root=data,
                         workers=1, index=False)  # fmt: skip
    assert [g["txt"].decode() for _, g in samples(result)] == ["one, two", "three"]
    assert meta(samples(result)[0])["source"] == "pics/x.jpg"


def test_csv_gif_reencoded_to_png(tmp_path):
    gif = image(tmp_path / "anim.gif", "GIF")
    csv = write_csv(tmp_path / "t.csv", [(str(gif), "a gif")])  # an absolute path
    result = convert_csv(csv, tmp_path / "out", reencode=True, workers=1, index=False)
    (key, group), *_ = samples(result)
    assert sorted(group) == ["json", "png", "txt"] and group["png"].startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(group["png"])).size == (16, 16)
    assert json.loads(group["json"])["original_format"] == "gif" and result.reencoded == 1


def test_csv_header_problems_are_errors_before_writing(tmp_path):
    image(tmp_path / "a.jpg")
    comma = write_csv(tmp_path / "comma.csv", [(str(tmp_path / "a.jpg"), "cap")], sep=",")
    with pytest.raises(ConfigError, match=r"separator is probably wrong.*--csv-separator ','"):
        convert_csv(comma, tmp_path / "out", index=False)  # the default separator is a tab

    named = write_csv(tmp_path / "named.csv", [(str(tmp_path / "a.jpg"), "cap")], header=("filepaths", "text"))
    with pytest.raises(ConfigError) as e:
        convert_csv(named, tmp_path / "out", index=False)
    message = str(e.value)
    assert "['filepaths', 'text']" in message and "--csv-img-key" in message and "--csv-caption-key" in message
    assert "perhaps --csv-img-key 'filepaths'" in message
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder

    (tmp_path / "header_only.csv").write_text("filepath\ttitle\n")
    with pytest.raises(ConfigError, match="no rows"):
        convert_csv(tmp_path / "header_only.csv", tmp_path / "out", index=False)

    (tmp_path / "latin1.csv").write_bytes(f"filepath\ttitle\n{tmp_path / 'a.jpg'}\tcaf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.csv: is not UTF-8 text.*re-save it as UTF-8"):
        convert_csv(tmp_path / "latin1.csv", tmp_path / "out", index=False)

    (tmp_path / "ragged.csv").write_text(f"filepath\ttitle\n{tmp_path / 'a.jpg'}\tok\nx\ty\tz\tw\n")
    with pytest.raises(ConfigError, match=r"ragged.csv: does not parse.*Expected 2 fields in line 3"):
        convert_csv(tmp_path / "ragged.csv", tmp_path / "out", index=False)
    assert not (tmp_path / "out").exists()


def test_csv_paths_relative_to_the_csv_name_root(tmp_path, monkeypatch):
    image(tmp_path / "set/img/a.jpg")
    csv = write_csv(tmp_path / "set/train.csv", [("img/a.jpg", "cap")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"pass --root .*set"):
        convert_csv(csv, tmp_path / "out", index=False)
    assert not (tmp_path / "out").exists()
    assert convert_csv(csv, tmp_path / "out", root=tmp_path / "set", index=False).written == 1


def test_folder_nested_upper_case_missing_caption_and_encodings(tmp_path):
    src = tmp_path / "src"
    image(src / "b/cat.JPG")
    (src / "b/cat.txt").write_text("a cat\n")
    image(src / "a/z/dog.png", "PNG")
    (src / "a/z/dog.txt").write_bytes("\ufeffa dog".encode())  # a BOM, as Notepad writes
    image(src / "a/owl.jpeg")
    (src / "a/owl.txt").write_bytes("caf\xe9 owl".encode("latin-1"))  # not UTF-8
    image(src / "a/nocap.jpg")
    image(src / "a/blank.jpg")
    (src / "a/blank.txt").write_text("  \n")
    (src / "a/notes.txt").write_text("no image of this name")
    image(src / "a/._owl.jpg")  # macOS' resource-fork debris: hidden, left out
    image(src / ".cache/x.jpg")
    (src / ".cache/x.txt").write_text("hidden")

    result = convert_folder(src, tmp_path / "out", workers=3, index=False)
    got = samples(result)
    assert [meta(s)["source"] for s in got] == ["a/owl.jpeg", "a/z/dog.png", "b/cat.JPG"]  # by path, recursively
    assert [sorted(g)[0] for _, g in got] == ["jpg", "json", "jpg"]  # .jpeg and .JPG become .jpg
    assert [g["txt"].decode() for _, g in got] == ["caf\ufffd owl", "a dog", "a cat"]
    assert "row" not in meta(got[0])
    assert result.replaced == ["a/owl.jpeg"] and "not valid UTF-8" in result.summary()
    report = json.loads(convert.report_path(tmp_path / "out", "shard").read_text())
    assert [(s["path"], s["reason"]) for s in report["skipped"]] == [
        ("a/blank.jpg", convert_rows.EMPTY_CAPTION), ("a/nocap.jpg", convert_rows.NO_CAPTION_FILE)]  # fmt: skip
    assert report["captions_not_utf8"] == ["a/owl.jpeg"]


def test_shard_size_splits_with_keys_running_across_shards(tmp_path):
    src = tmp_path / "src"
    for i in range(25):
        image(src / f"{i:02d}.jpg", colour=(i * 10, 0, 0))
        (src / f"{i:02d}.txt").write_text(f"caption {i}")
    result = convert_folder(src, tmp_path / "out", shard_size=10, workers=2, index=False)
    assert tars(tmp_path / "out") == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert result.samples == [10, 10, 5]
    got = samples(result)
    assert [k for k, _ in got] == [f"{i:09d}" for i in range(25)]
    assert [g["txt"].decode() for _, g in got] == [f"caption {i}" for i in range(25)]  # input order
    with tarfile.open(result.shards[1]) as tar:
        names = tar.getnames()
    assert names[:3] == ["000000010.jpg", "000000010.txt", "000000010.json"]  # a sample's files in a row
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_output_does_not_depend_on_workers(tmp_path):
    src = tmp_path / "src"
    for i in range(12):
        image(src / f"{i:02d}.png", "PNG", colour=(0, i * 20, 0))
        (src / f"{i:02d}.txt").write_text(f"c{i}")
    one = convert_folder(src, tmp_path / "one", shard_size=5, workers=1, index=False)
    four = convert_folder(src, tmp_path / "four", shard_size=5, workers=4, index=False)
    assert [p.read_bytes() for p in one.shards] == [p.read_bytes() for p in four.shards]


def folder_of(tmp_path: Path, n: int, name: str = "src") -> Path:
    src = tmp_path / name
    for i in range(n):
        image(src / f"{i:02d}.jpg")
        (src / f"{i:02d}.txt").write_text(f"caption {i}")
    return src


def test_refuses_to_overwrite_and_replaces_only_its_shards(tmp_path):
    out = tmp_path / "out"
    convert_folder(folder_of(tmp_path, 25), out, shard_size=10, index=False)
    (out / "shard-000002.idx").write_text("v1.2 5\n")  # an index of a shard about to be replaced
    (out / "notes.txt").write_text("mine")
    (out / "other-000000.tar").write_bytes(b"not ours")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(ConfigError, match=r"already holds 3 shard\(s\).*--overwrite"):
        convert_folder(folder_of(tmp_path, 5, "small"), out, index=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    result = convert_folder(tmp_path / "small", out, overwrite=True, index=False)
    assert result.samples == [5]
    assert tars(out) == ["other-000000.tar", "shard-000000.tar"]  # the stale shards 1 and 2 are gone
    assert not (out / "shard-000002.idx").exists()
    assert (out / "notes.txt").read_text() == "mine" and (out / "other-000000.tar").read_bytes() == b"not ours"


def test_sets_of_other_prefixes_in_one_folder_keep_their_reports(tmp_path):
    """--prefix b into a folder holding set a wrote over a's convert_report.json."""
    out = tmp_path / "out"
    (folder_of(tmp_path, 3, "a") / "00.txt").unlink()  # a's first image has no caption: a's report lists it
    a = convert_folder(tmp_path / "a", out, prefix="a", index=False)
    b = convert_folder(folder_of(tmp_path, 2, "b"), out, prefix="b", index=False)
    assert (a.report, b.report) == (out / "a.convert_report.json", out / "b.convert_report.json")
    reports = {name: json.loads((out / f"{name}.convert_report.json").read_text()) for name in "ab"}
    assert reports["a"]["shards"] == {"a-000000.tar": 2} and reports["b"]["shards"] == {"b-000000.tar": 2}
    assert [(s["path"], s["reason"]) for s in reports["a"]["skipped"]] == [("00.jpg", convert_rows.NO_CAPTION_FILE)]
    assert reports["b"]["skipped"] == [] and str(a.report) in a.summary()


def test_overwrite_that_writes_nothing_keeps_the_old_shards(tmp_path):
    out = tmp_path / "out"
    convert_folder(folder_of(tmp_path, 3), out, index=False)
    old = (out / "shard-000000.tar").read_bytes()
    csv = write_csv(tmp_path / "t.csv", [("nowhere/a.jpg", "x"), ("nowhere/b.jpg", "y")])
    with pytest.raises(ConfigError, match=r"none of its 2 rows makes a sample \(2 image not found\)"):
        convert_csv(csv, out, overwrite=True, index=False)
    assert (out / "shard-000000.tar").read_bytes() == old
    assert len(json.loads(convert.report_path(out, "shard").read_text())["skipped"]) == 2


def test_overwrite_without_index_refused_where_sizes_json_counts_the_old_shards(tmp_path):
    out = tmp_path / "out"
    convert_folder(folder_of(tmp_path, 3), out, index=False)
    (out / "sizes.json").write_text(json.dumps({"shard-000000.tar": 3}))
    with pytest.raises(ConfigError, match="sizes.json counts the shards being replaced"):
        convert_folder(tmp_path / "src", out, overwrite=True, index=False)


def test_a_failure_mid_way_leaves_only_complete_shards(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_add, calls = shard_writer._add, []

    def failing_add(tar, name, payload):
        calls.append(name)
        if len(calls) == 3 * 13:  # the 13th sample: the second shard is half written
            assert tars(out) == ["shard-000000.tar"]  # what a kill now would leave: a whole shard, a .tmp
            assert [p.name for p in out.glob("*.tmp")] == ["shard-000001.tar.tmp"]
            raise OSError(28, "No space left on device")
        real_add(tar, name, payload)

    monkeypatch.setattr(shard_writer, "_add", failing_add)
    with pytest.raises(OSError, match="No space"):
        convert_folder(folder_of(tmp_path, 25), out, shard_size=10, workers=2, index=False)
    assert tars(out) == ["shard-000000.tar"] and not list(out.glob("*.tmp"))
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert sum(1 for _ in member_groups(tar)) == 10


def test_shards_index_whole_with_fastclips_index(tmp_path):
    from fastclip.data import index

    result = convert_folder(folder_of(tmp_path, 5), tmp_path / "out", shard_size=2, workers=1)
    assert [f.count for f in result.indexed] == [2, 2, 1]  # every sample written passes the index's checks
    assert json.loads((tmp_path / "out" / index.SIZES).read_text()) == {
        "shard-000000.tar": 2, "shard-000001.tar": 2, "shard-000002.tar": 1}  # fmt: skip
    assert all((tmp_path / "out" / f"shard-00000{i}.idx").is_file() for i in range(3))
    assert "indexed: a .idx beside each shard" in result.summary() and "left out" not in result.summary()


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="convert")
    shards._convert_arguments(parser)
    return parser.parse_args(argv)


def test_cli(tmp_path, monkeypatch, capsys):
    """Exit codes: 0 written; 1 when the data must change (no row makes a sample); 2 for the command itself."""
    monkeypatch.chdir(tmp_path)
    image(tmp_path / "a.jpg")
    write_csv(tmp_path / "t.csv", [("a.jpg", "a cat")])
    args = parse(["--csv", "t.csv", "--out", "out", "--csv-separator", "\\t", "--no-index", "--workers", "1"])
    assert args.csv_separator == "\t"
    convert = ["convert", "--no-index"]
    assert shards.main([*convert, "--csv", "t.csv", "--out", "out", "--csv-separator", "\\t", "--workers", "1"]) == 0
    assert "wrote 1 sample in 1 shard" in capsys.readouterr().out

    write_csv(tmp_path / "bad.csv", [("gone.jpg", "x")])
    assert shards.main([*convert, "--csv", "bad.csv", "--out", "out2"]) == 1  # the data
    err = capsys.readouterr().err
    assert "none of its 1 rows makes a sample" in err and "shard.convert_report.json" in err
    assert shards.main([*convert, "--csv", "t.csv", "--out", "out"]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert shards.main([*convert, "--folder", ".", "--root", "x", "--out", "o"]) == 2

    parser = argparse.ArgumentParser()
    shards._convert_arguments(parser)
    assert "current directory" in parser.format_help()
    with pytest.raises(SystemExit):
        parse(["--csv", "t.csv", "--folder", ".", "--out", "o"])  # one source or the other


def test_webdataset_reads_the_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    result = convert_folder(folder_of(tmp_path, 5), tmp_path / "out", shard_size=2, workers=1, index=False)
    read = list(wds.WebDataset([str(p) for p in result.shards], shardshuffle=False))
    assert [s["__key__"] for s in read] == [f"{i:09d}" for i in range(5)]
    assert all({"jpg", "txt", "json"} <= set(s) for s in read)
