"""Which samples each torch-loader worker reads, and from where: the split of an epoch among ranks and workers,
resampled draws, reading a shard by its index file or its tar headers, and shards that fail when first read.

A worker's stream yields transformed samples (the transform is fastclip/data/torch_loader.py's); an image that
does not decode is skipped and counted there, in the stream, so that every batch stays full.
"""

from __future__ import annotations

import itertools
import os
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch.utils.data import IterableDataset, get_worker_info

from fastclip.data.index import read_index
from fastclip.data.loader import derive_seed
from fastclip.data.remote import DEFAULT, RemotePolicy, display, is_remote, open_shard, read_range
from fastclip.data.skips import DataBroken, Undecodable, log
from fastclip.data.tar_layout import IMAGE_EXTS, member_groups, usable


def _walked(path: str, start: int, stop: int | None, policy: RemotePolicy = DEFAULT) -> Iterator[dict]:
    """A shard's usable samples ``start`` to ``stop`` as {extension: bytes}, from its tar headers; the payloads of
    the samples before ``start`` are skipped, not read (a remote shard's, where they span chunks: a range request
    goes past them). A remote shard cut short fails its read (fastclip/data/remote.py), never passing for a
    whole one with fewer samples."""
    with open_shard(path, policy) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        usable_samples = (item for item in member_groups(tar) if usable(item[1]))
        for key, group in itertools.islice(usable_samples, start, stop):
            sample = {ext: tar.extractfile(member).read() for ext, member in group.items()}
            yield {**sample, "__key__": key, "__shard__": display(path)}


def _indexed(
    path: str, idx: str, start: int, stop: int | None, size: int | None, policy: RemotePolicy = DEFAULT,
    deferred: Callable[[], bool] = lambda: False,
) -> Iterator[dict]:  # fmt: skip
    """The same from the shard's index file: each sample's files read at their offsets, no header read. Samples
    without an image or a caption are passed over (an index DALI's wds2idx wrote lists every sample). While
    ``deferred()`` (a resumed stream replaying its order) a sample comes without its bytes, and the shard is
    opened at the first sample read: a remote one by a range request from there."""
    samples = [(key, files) for key, files in read_index(idx) if usable(files)][start:stop]
    f = None
    try:
        for key, files in samples:
            wanted = {ext: span for ext, span in files.items() if ext in IMAGE_EXTS or ext in ("txt", "cls")}
            if deferred():
                yield {"__key__": key, "__shard__": display(path), DEFERRED: (path, wanted, policy)}
                continue
            if f is None:
                f = open_shard(path, policy, expect_size=size)
                if size is not None and not is_remote(path) and (now := os.fstat(f.fileno()).st_size) != size:
                    raise OSError(f"it is {now} bytes, {size} when it was indexed: re-run the index tool on it")
            yield {"__key__": key, "__shard__": display(path), **_read_files(f, key, wanted)}
    finally:
        if f is not None:
            f.close()


def _read_files(f, key: str, files: dict[str, tuple[int, int]]) -> dict[str, bytes]:
    sample = {}
    for ext, (offset, size) in files.items():
        f.seek(offset)
        if len(data := f.read(size)) != size:
            raise OSError(f"it ends inside {key}.{ext}, at byte {offset + len(data)}: truncated since it was "
                          "indexed; re-run the index tool on it")  # fmt: skip
        sample[ext] = data
    return sample


DEFERRED = "__deferred__"  # a replayed sample's (shard, {ext: (offset, size)}, policy): its bytes not yet read


def fetch_deferred(sample: dict) -> dict:
    """A replayed sample that outlasted the replay in the shuffle buffer, read now: one range request for its
    files (adjacent in the tar)."""
    path, files, policy = sample.pop(DEFERRED)
    lo, hi = min(o for o, _ in files.values()), max(o + n for o, n in files.values())
    data = read_range(path, lo, hi - lo, policy)
    return {**sample, **{ext: data[o - lo : o - lo + n] for ext, (o, n) in files.items()}}


def bounds(total: int, slot: int, slots: int) -> tuple[int, int]:
    """Slot ``slot``'s samples ``[lo, hi)`` of ``total``: the first ``total % slots`` slots get one more, so that a
    rank's workers, taken in turn by the DataLoader from worker 0, run out in the same round."""
    base, extra = divmod(total, slots)
    lo = slot * base + min(slot, extra)
    return lo, lo + base + (slot < extra)


@dataclass(frozen=True)
class Shard:
    path: str
    samples: int | None  # usable samples, where known
    index: str | None  # its index file, where there is one
    size: int | None = None  # its bytes when it was indexed, where recorded
    policy: RemotePolicy = DEFAULT  # how a remote shard's reads are retried

    def read(self, start: int = 0, stop: int | None = None, deferred=lambda: False) -> Iterator[dict]:
        if self.index:
            return _indexed(self.path, self.index, start, stop, self.size, self.policy, deferred)
        return _walked(self.path, start, stop, self.policy)


class BadShards:
    """Shards found unreadable when first read (start-up opens only some): each logged once and skipped for the
    rest of the run. Past ``max_bad_fraction`` of the shards this worker has tried, and once it has tried enough
    for that fraction to mean something (``1 / max_bad_fraction``, or every shard), the run stops."""

    def __init__(self, max_bad_fraction: float, *, shards: int):
        self.max_bad_fraction, self.shards = max_bad_fraction, shards
        self.paths: set[str] = set()
        self.tried: set[str] = set()
        self.last: dict[str, str] = {}  # the bad shards, in the order found, with why

    def check(self, path: str, error: Exception | None) -> None:
        """Count a read of ``path``; ``error`` when it failed."""
        self.tried.add(path)
        if error is not None:
            self.paths.add(path)
            self.last[display(path)] = str(error)
        bad, tried, fraction = len(self.paths), len(self.tried), self.max_bad_fraction
        if bad > fraction * tried and tried >= min(self.shards, 1 / fraction if fraction else 1):
            last = ": ".join(next(reversed(self.last.items())))
            raise DataBroken(
                f"{bad} of the {tried} shards this loader worker has read are unreadable (the last: {last}), more "
                f"than data.max_bad_fraction={fraction} allows. Re-create them, remove them from the spec, or raise "
                "--data.max_bad_fraction."
            )
        if error is not None:
            log.warning("skipped shard %s: unreadable (%s); %d of %d shards skipped by this loader worker",
                        display(path), error, bad, tried)  # fmt: skip

    def read(self, shard: Shard, start: int = 0, stop: int | None = None, deferred=lambda: False) -> Iterator[dict]:
        """``shard``'s samples, none if it failed before; a failure is counted, logged or stops the run."""
        if shard.path in self.paths:
            return
        try:
            yield from shard.read(start, stop, deferred)
        except (tarfile.TarError, OSError, ValueError) as e:  # start-up did not open it, or it changed since
            self.check(shard.path, e)
            return
        self.check(shard.path, None)


class ShardStream(IterableDataset):
    """This rank's and this worker's share of the samples. Every rank and worker draws one order of the shards
    (from ``seed`` and the epoch); where the shards are counted, slot ``s`` of ``n`` reads the samples whose
    running index in that order is in ``[total * s / n, total * (s + 1) / n)``: a run of whole shards, read in
    sequence as a filesystem likes, the slots' shares differing by one sample at most. Uncounted (with
    ``train_num_samples`` and no index files), slot ``s`` reads the shards at places ``s``, ``s + n``, ... whole,
    as open_clip's loader does. Either way the slots partition each epoch: every sample read once, by one worker
    of one rank. Resampled, each worker instead draws shards with replacement from its own stream."""

    def __init__(
        self, *, shards: list[Shard], train: bool, rank: int, world_size: int, seed: int, shuffle_buffer: int,
        transform, skips, bad: BadShards, resampled: bool = False,
    ):  # fmt: skip
        self.shards, self.train, self.rank, self.world_size = shards, train, rank, world_size
        self.seed, self.shuffle_buffer, self.transform, self.skips = seed, shuffle_buffer, transform, skips
        self.bad, self.resampled = bad, resampled
        self.counted = all(s.samples is not None for s in shards)
        # set by WorkerStreams.restore before the workers start: the batches taken, and each stream's samples read
        self.resume_batches, self.batch_size, self.resume_reads = 0, 1, None

    def _consumed(self, worker: int, workers: int) -> int:
        """Samples stream ``worker`` had read before the restored position, skipped ones included. Positions saved
        before the count was kept say only the batches taken, from the workers in turn from worker 0: batches
        times their size, which falls short by the samples skipped before the position."""
        if self.resume_reads is not None:
            return self.resume_reads[worker]
        return len(range(worker, self.resume_batches, workers)) * self.batch_size

    def share(self, epoch: int, slot: int, slots: int) -> list[tuple[Shard, int, int | None]]:
        """The (shard, start, stop) ranges slot ``slot`` of ``slots`` reads in ``epoch``."""
        shards = list(self.shards)
        if self.train:
            # the same order on every rank and worker: the split into slots stays exact
            random.Random(derive_seed(self.seed, "shard order", epoch)).shuffle(shards)
        if not self.counted:
            return [(shard, 0, None) for shard in shards[slot::slots]]
        lo, hi = bounds(sum(shard.samples for shard in shards), slot, slots)
        start, ranges = 0, []
        for shard in shards:
            first, last = max(lo - start, 0), min(hi - start, shard.samples)
            if first < last:
                ranges.append((shard, first, last))
            start += shard.samples
        return ranges

    def _ordered(self, epoch: int, slot: int, slots: int, deferred=lambda: False) -> Iterator[dict]:
        ranges, empty = self.share(epoch, slot, slots), True
        for shard, start, stop in ranges:
            for sample in self.bad.read(shard, start, stop, deferred):
                empty = False
                yield sample
        if empty and self.train:  # else the next epoch would find none either, forever
            raise DataBroken(
                f"loader worker {slot % max(slots // self.world_size, 1)} of rank {self.rank} read no sample in a "
                f"whole pass over the shards ({len(self.shards)} shards, {slots} loader workers in all"
                + ("" if self.counted else "; uncounted, each worker reads whole shards")
                + "). Lower --data.num_threads, or index the shards (python -m fastclip.data.shards index)."
            )

    def _drawn(self, worker: int) -> Iterator[dict]:
        rng = random.Random(derive_seed(self.seed, "shard draws", self.rank, worker))
        while True:
            yield from self.bad.read(rng.choice(self.shards))

    def __iter__(self):
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        # after a restore the DataLoader asks its workers in turn from worker 0 again, while the stream's next
        # batch belongs to the stream of worker resume_batches % workers: rotate which stream each worker runs
        worker = (worker + self.resume_batches) % workers
        slots, slot = self.world_size * workers, self.rank * workers + worker
        rng = random.Random(derive_seed(self.seed, "buffer shuffle", self.rank, worker))
        epoch, consumed = 0, self._consumed(worker, workers)
        read = consumed  # this stream's samples read since its start, each item carries it: the exact position
        replaying = lambda: consumed > 0  # noqa: E731  (indexed shards' samples come without bytes until the end)
        while True:
            samples = self._drawn(worker) if self.resampled else self._ordered(epoch, slot, slots, replaying)
            for sample in self._shuffled(samples, rng):
                if consumed:  # replaying up to a restored position: the same order, nothing read or decoded
                    consumed -= 1
                    continue
                if DEFERRED in sample and (sample := self._fetch(sample)) is None:
                    continue
                read += 1
                try:  # a corrupt image is dropped before batching, so every batch stays full
                    item = self.transform(sample)
                except Undecodable as e:
                    raw = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
                    self.skips.skip(key=sample["__key__"], shard=sample["__shard__"], data=raw, error=str(e))
                    continue
                self.skips.kept()
                yield *item, read
            if not self.train:
                return
            epoch += 1

    def _fetch(self, sample: dict) -> dict | None:
        """A deferred sample's bytes; None (its shard counted as unreadable) when they cannot be read."""
        path = sample[DEFERRED][0]
        try:
            return fetch_deferred(sample)
        except OSError as e:
            self.bad.check(path, e)
            return None

    def _shuffled(self, samples: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        if not self.train:
            yield from samples
            return
        buffer: list = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))
