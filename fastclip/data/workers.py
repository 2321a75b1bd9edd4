"""This rank's share of the shards, read by torch DataLoader worker processes: how many workers, the stream each
one runs (fastclip/data/shard_stream.py), their batches taken in turn, and the position after each batch, from
which a restored stream goes on exactly.

Two loaders read through it: the torch loader, which decodes what the workers hand over
(fastclip/data/torch_loader.py), and the DALI loader on remote shards, whose decoder takes the workers' encoded
samples (fastclip/data/dali_stream.py) because DALI's own reader opens local files only.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from fastclip.data.batch import BatchCount, check_stream
from fastclip.data.loader import LoaderRequest, derive_seed
from fastclip.data.shard_specs import Shards
from fastclip.data.shard_stream import BadShards, Shard, ShardStream, bounds
from fastclip.data.skips import DataBroken, Skips
from fastclip.preemption import worker_signals

_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None  # not on Windows


class PackedImages(NamedTuple):
    """A batch's images as the workers hand them over undecoded: every encoded image's bytes in one tensor
    (``data[offsets[i]:offsets[i + 1]]``) and any decoded in the worker, by position. One tensor instead of one per
    sample: a worker hands each tensor to the main process as a file descriptor, and a batch of 512 passed one by
    one exhausted a 1,024-descriptor limit (an emulation of the GPU machine's loader)."""

    data: torch.Tensor  # uint8 [total bytes]
    offsets: torch.Tensor  # int64 [n + 1]; a decoded image's span is empty
    decoded: dict[int, torch.Tensor]  # position -> uint8 [3, H, W]

    @classmethod
    def pack(cls, images: list[torch.Tensor]) -> PackedImages:
        sizes = [0] + [im.numel() if im.dim() == 1 else 0 for im in images]
        data = torch.cat([im for im in images if im.dim() == 1]) if any(sizes) else torch.empty(0, dtype=torch.uint8)
        decoded = {i: im for i, im in enumerate(images) if im.dim() == 3}
        return cls(data, torch.tensor(sizes, dtype=torch.int64).cumsum(0), decoded)

    def unpack(self) -> list[torch.Tensor]:
        """Encoded bytes [n] or decoded pixels [3, H, W] per position, views of ``data`` (no copy)."""
        bounds = self.offsets.tolist()
        return [self.decoded.get(i, self.data[lo:hi]) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


class WorkerStreams:
    """This rank's :class:`ShardStream` in DataLoader workers, each sample through ``transform`` and each batch
    through ``collate``, whose last item must be the count of samples its worker's stream had read (the stream
    yields it with every sample). Iterating gives the collated batches; :meth:`position` says where the stream
    stands after the last one taken."""

    def __init__(
        self, shards: Shards, request: LoaderRequest, *, transform: Callable, collate: Callable, skips: Skips,
        pin_memory: bool,
    ):  # fmt: skip
        options, train, rank, world_size = request.options, request.train, request.rank, request.world_size
        total = shards.total
        self.samples_per_epoch = options.train_num_samples if train and options.train_num_samples else total
        self.epoch_from = "data.train_num_samples" if self.samples_per_epoch != total else shards.counted_from
        self.batch_size, self.train = options.batch_size, train
        counts = shards.samples or [None] * len(shards.paths)
        bad = BadShards(options.max_bad_fraction, shards=len(shards.paths))
        self.stream = stream = ShardStream(
            shards=[Shard(*s, policy=options.remote) for s in zip(shards.paths, counts, shards.index,
                                                                  shards.indexed_bytes)], train=train,
            rank=rank, world_size=world_size, seed=request.seed, shuffle_buffer=options.shuffle_buffer,
            transform=transform, skips=skips, bad=bad, resampled=train and options.resampled,
        )  # fmt: skip
        self.workers = self._workers(options.workers, total, world_size)
        slots = world_size * self.workers  # this rank's samples of an epoch: those of its workers' slots
        if total is None or self.samples_per_epoch != total:  # this rank's share of the epoch's length
            n = self.samples_per_epoch
            self.local_samples = n * (rank + 1) // world_size - n * rank // world_size
        else:  # its workers' slots: the same in every epoch
            mine = [bounds(total, slot, slots) for slot in range(rank * self.workers, (rank + 1) * self.workers)]
            self.local_samples = sum(hi - lo for lo, hi in mine)
        self.taken = 0  # batches taken from the DataLoader
        self.reads = [0] * self.workers  # samples each worker's stream has read: the position of a train batch
        self.loader = DataLoader(
            stream, batch_size=options.batch_size, num_workers=self.workers, collate_fn=collate,
            pin_memory=pin_memory, drop_last=train, persistent_workers=train, prefetch_factor=4,
            # the workers' crops: drawn apart on each rank (the process-wide RNG is seeded alike on every rank)
            generator=torch.Generator().manual_seed(derive_seed(request.seed, "worker crops", rank)),
            worker_init_fn=worker_signals,  # a cluster's SIGTERM reaches every process: the rank ends them
            # Python 3.14 makes forkserver Linux's default: each worker would import torch and fastclip again (the
            # val loader's in every eval: its workers do not persist) and get the stream pickled
            multiprocessing_context=_FORK if self.workers else None,
        )  # fmt: skip

    def _workers(self, asked: int, total: int, world_size: int) -> int:
        """Worker processes: as asked, but fewer for a small val set (each costs a start-up), and never one whose
        slot holds no sample (it would spin forever on an empty stream)."""
        if total is None:  # not counted (train_num_samples): a pass with too few samples for a worker says so
            return asked
        workers = asked if self.train else min(asked, max(total // 64, 1))
        return max(min(workers, total // world_size), 1)

    def restore(self, state: dict) -> str | None:
        """Go on from a train batch's position (``BatchCount.state()``); before the first iteration only. Returns
        how the stream may differ from an uninterrupted one, or None where it goes on exactly (up to the random
        crops, drawn afresh)."""
        check_stream(state, "torch")
        if state.get("workers") != self.workers:
            raise ValueError(f"the position was saved with {state.get('workers')} loader workers, now {self.workers}")
        self.stream.resume_batches, self.stream.batch_size = int(state["batches"]), self.batch_size
        self.taken = int(state["batches"])
        reads = state.get("reads")
        self.stream.resume_reads = list(reads) if reads else None
        self.reads = [self.stream._consumed(s, self.workers) for s in range(self.workers)]
        if not reads:
            return (
                "the position was saved by a fastclip that counted batches only: the stream is shifted by as many "
                "samples as were skipped as undecodable before the checkpoint"
            )
        if state.get("held"):
            return (
                f"{state['held']} samples held back to refill a batch after an image the GPU decode skipped are not "
                "replayed"
            )
        return None

    def __iter__(self) -> Iterator:
        try:
            for batch in self.loader:
                self.taken += 1
                self.reads[(self.taken - 1) % self.workers] = batch[-1]  # workers hand over batches in turn
                yield batch
        except DataBroken as e:
            raise DataBroken.from_worker(e) from None

    def position(self, held: int = 0) -> BatchCount:
        """Where the stream stands after the last batch taken, ``held`` of its samples not handed on yet."""
        return BatchCount(self.taken, self.workers, tuple(self.reads), held)

    def close(self) -> None:
        self.loader = None
