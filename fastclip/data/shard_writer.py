"""Shards written whole or not at all (fastclip/data/convert.py writes through it): each under a temporary name
renamed when complete, the shards it replaces removed only once the first new one is whole."""

from __future__ import annotations

import glob
import io
import os
import tarfile
import time
from pathlib import Path

from fastclip.console import counted
from fastclip.data.index import SIZES, read_json_object
from fastclip.errors import ConfigError

KEY_DIGITS = 9  # keys sort as text while they stay under a billion samples
SHARD_DIGITS = 6


def _existing(out_dir: Path, prefix: str) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(str(out_dir)), glob.escape(prefix) + "-*.tar")))


def check_out_dir(out_dir: Path, prefix: str, *, overwrite: bool, index: bool) -> list[Path]:
    """The shards an earlier conversion left that this one replaces (checked before anything is written)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir}: is a file, not a folder")
    old = _existing(out_dir, prefix)
    if old and not overwrite:
        raise ConfigError(
            f"--out {out_dir}: already holds {len(old)} shard(s) named {prefix}-*.tar (e.g. {old[0].name}). Pass "
            "--overwrite to replace them, or choose another --out or --prefix"
        )
    if old and not index:
        try:  # unreadable, it cannot say whether it counts them: refused, as a stale count would be worse
            sizes = read_json_object(out_dir / SIZES)
        except ValueError as e:
            raise ConfigError(f"--out {out_dir}: {e}") from None
        except OSError as e:
            raise ConfigError(
                f"--out {out_dir}: cannot read its {SIZES} ({e.strerror or e}); fix or remove it"
            ) from None
        counted_old = [p.name for p in old if p.name in sizes]
        if counted_old:
            raise ConfigError(
                f"--out {out_dir}: its sizes.json counts the shards being replaced (e.g. {counted_old[0]}); with "
                "--no-index it would give the new shards the old counts. Drop --no-index (the new shards are "
                "indexed and their counts replaced)"
            )
    return old


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # the same input gives the same bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


class ShardWriter:
    """Writes shards of ``shard_size`` samples, each under a temporary name renamed when complete: a conversion
    killed at any point leaves only whole ``{prefix}-NNNNNN.tar`` files. The shards it replaces (``old``) are
    removed when the first new one is complete, so that a conversion that writes nothing keeps them."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int, old: list[Path]):
        self.out_dir, self.prefix, self.shard_size, self.old = out_dir, prefix, shard_size, old
        self.shards: list[Path] = []
        self.samples: list[int] = []
        self._file = self._tar = self._tmp = None
        self._count = 0
        self._start = 0.0

    def _path(self, n: int) -> Path:
        return self.out_dir / f"{self.prefix}-{n:0{SHARD_DIGITS}d}.tar"

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self._tar is None:
            self._tmp = self._path(len(self.shards)).with_suffix(".tar.tmp")
            self._file = open(self._tmp, "wb")
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
            self._count, self._start = 0, time.perf_counter()
        for ext, payload in members:  # one sample's files in a row, as webdataset groups them
            _add(self._tar, f"{key}.{ext}", payload)
        self._count += 1
        if self._count == self.shard_size:
            self.finish()

    def finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the data on disk before the name says the shard is whole
        self._file.close()
        if not self.shards:
            self._remove_old()
        path = self._path(len(self.shards))
        os.replace(self._tmp, path)
        self.shards.append(path)
        self.samples.append(self._count)
        print(f"{path}: {counted(self._count, 'sample')} ({time.perf_counter() - self._start:.1f}s)", flush=True)
        self._tar = self._file = self._tmp = None

    def abort(self) -> None:
        """Remove the shard being written (an error or Ctrl-C): its temporary file is this run's own."""
        if self._file is not None:
            self._file.close()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._tar = self._file = self._tmp = None

    def _remove_old(self) -> None:
        """The shards --overwrite replaces, with what belongs to them alone: DALI's index beside each (it would
        point into the new shard of the same name) and a temporary file a killed conversion left."""
        for tar in self.old:
            tar.unlink(missing_ok=True)
            tar.with_suffix(".idx").unlink(missing_ok=True)
        pattern = glob.escape(str(self.out_dir / self.prefix)) + "-*.tar.tmp"
        for tmp in glob.glob(pattern):
            if Path(tmp) != self._tmp:
                Path(tmp).unlink(missing_ok=True)
