"""The contract both loaders keep: what a loader does (:class:`Loader`), what it is built from
(:class:`LoaderRequest`), and the seeds of its random streams.

A loader is built for one rank and one split (``train`` or val) by fastclip/data/build.py: DALI where it is
installed (fastclip/data/dali.py), else a torch DataLoader (fastclip/data/torch_loader.py). Both read the same
shards (fastclip/data/shard_specs.py: which files, which samples) into the same :class:`~fastclip.data.batch.Batch`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from fastclip.config import DataConfig
from fastclip.data.batch import Batch
from fastclip.data.remote import DEFAULT, RemotePolicy
from fastclip.data.shard_specs import Shards, resolve_shards
from fastclip.model import ImageSpec
from fastclip.world import cpu_set


class Loader(Protocol):
    """What the trainer and the evaluation use of a loader.

    A training loader never ends: it wraps epochs, and in each one every sample is read once, by one rank. A
    val loader yields each of this rank's samples once per pass, in the same order every pass, with labels
    (-1 where a sample has no ``KEY.cls``). Samples without an image or a caption are left out, as open_clip
    does; an image that does not decode is skipped, named in the log and counted, and a training batch keeps
    its size.
    """

    samples_per_epoch: int  # usable samples of one pass over all ranks
    epoch_from: str  # where that number comes from, for the start-up line
    local_samples: int  # this rank's share of them
    batch_size: int

    @property
    def skipped(self) -> int:
        """Samples this rank dropped because their image did not decode."""

    def __iter__(self) -> Iterator[Batch]: ...

    def restore(self, state: dict[str, Any]) -> str | None:
        """Go on from a training batch's ``position.state()``; ValueError when another loader saved it. Returns
        how the stream will differ from an uninterrupted one, None when it goes on exactly."""

    def close(self) -> None:
        """Stop the loader's threads and processes."""


@dataclass(frozen=True)
class LoaderOptions:
    """The data settings a loader uses (from :class:`~fastclip.config.DataConfig`)."""

    batch_size: int
    workers: int  # DALI CPU threads, or DataLoader worker processes
    shuffle_buffer: int  # samples (per rank; per worker with the torch loader)
    decode_device: str  # 'auto', 'mixed' or 'cpu'
    crop_scale: tuple[float, float]
    max_bad_fraction: float
    train_num_samples: int | None = None  # an epoch's samples, when set: nothing is counted for training
    resampled: bool = False  # training draws shards with replacement, per rank
    index_dir: str | None = None
    check_shards: int | None = None  # shards opened at start-up; the rest when first read (None: all)
    remote: RemotePolicy = DEFAULT  # how reads of remote shards are retried

    @classmethod
    def of(cls, data: DataConfig) -> LoaderOptions:
        return cls(
            # a loader built outside a run (tools, tests) resolves 0 as a rank alone on its node would
            batch_size=data.batch_size, workers=data.num_threads or auto_threads(1)[0],
            shuffle_buffer=data.shuffle_buffer,
            decode_device=data.decode_device, crop_scale=data.crop_scale, max_bad_fraction=data.max_bad_fraction,
            train_num_samples=data.train_num_samples, resampled=data.resampled, index_dir=data.index_dir,
            check_shards=data.check_shards,
            remote=RemotePolicy(retries=data.remote_retries, timeout_s=data.remote_timeout_s),
        )  # fmt: skip

    def resolve(self, spec: str, *, field: str, train: bool, count: bool = True) -> Shards:
        """``spec``'s shards as this loader reads them. Training with ``train_num_samples`` counts nothing."""
        return resolve_shards(
            spec, field=field, max_bad_fraction=self.max_bad_fraction, index_dir=self.index_dir,
            check=self.check_shards, count=count and not (train and self.train_num_samples), policy=self.remote,
        )  # fmt: skip


@dataclass(frozen=True)
class LoaderRequest:
    """One rank's loader for one split, as both loaders are built from it (fastclip/data/build.py makes it)."""

    spec: str  # the shard spec
    field: str  # its config field, for messages: 'data.train_shards' or 'data.val_shards'
    options: LoaderOptions
    image: ImageSpec
    tokenizer: Callable[[list[str]], torch.Tensor]
    train: bool
    rank: int
    world_size: int
    seed: int  # the run's, the same on every rank: loaders derive their per-rank streams from it
    device: torch.device

    def shards(self, *, count: bool = True) -> Shards:
        """The spec's shards as this loader reads them (:meth:`LoaderOptions.resolve`)."""
        return self.options.resolve(self.spec, field=self.field, train=self.train, count=count)


# the random streams of a run's data path; each draws its seed from the run's seed, its purpose and its ids
STREAMS = ("shard order", "reader shuffle", "decoder crops", "buffer shuffle", "worker crops", "shard draws")


def derive_seed(seed: int, stream: str, *ids: int) -> int:
    """The seed of one random stream of a run (``stream``, one of :data:`STREAMS`, for the epoch, rank, worker or
    decoder ``ids``): independent of every other stream, the same in every run with ``seed`` (negative ones too).
    A stream always passes the same number of ids, so ids ending in 0 cannot collide with shorter ones."""
    entropy = [seed % 2**64, STREAMS.index(stream), *ids]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


MAX_AUTO_THREADS = 16  # past this a rank's decode rarely gains, and a node's other work needs cores too


def auto_threads(sharers: int) -> tuple[int, str]:
    """``data.num_threads`` 0 resolved: the cores this process may run on (its CPU affinity: a scheduler's cgroup,
    taskset or a launcher's binding, not the machine's count) divided among the ``sharers``, the ranks of this node
    that may run on the same cores (:attr:`fastclip.world.World.cpu_sharers`), 1 to 16; and why, for the log."""
    cores = len(cpu_set())
    threads = max(1, min(MAX_AUTO_THREADS, cores // max(sharers, 1)))
    return threads, f"{cores} cores this rank may use / {sharers} rank(s) sharing them, at most {MAX_AUTO_THREADS}"
