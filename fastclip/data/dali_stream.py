"""The DALI loader's reader for shards DALI cannot open: remote ones (``s3://``, ``http(s)://``, ``pipe:``), whose
bytes DALI's webdataset reader cannot fetch. DataLoader workers stream the samples undecoded
(fastclip/data/workers.py, with the retries, range requests and exact positions of fastclip/data/remote.py and
shard_stream.py), and :class:`StreamReader` hands them to the DALI loader (fastclip/data/dali.py) in the shape of
DALI's own reader pipeline, so that decoding stays DALI's (nvJPEG on a GPU) and the loader's skips, recalls and
positions work unchanged.
"""

from __future__ import annotations

import json

import numpy as np
import torch

from fastclip.data.loader import LoaderRequest
from fastclip.data.shard_specs import Shards
from fastclip.data.skips import Skips
from fastclip.data.tar_layout import IMAGE_EXTS
from fastclip.data.workers import PackedImages, WorkerStreams


def _encoded(sample: dict):
    """A worker's sample as DALI's reader gives one: image bytes (uint8 [n]), caption and class bytes, and its
    source as 'shard:offset:key.ext' (the offset unknown here: '-')."""
    ext = next(e for e in IMAGE_EXTS if e in sample)
    image = torch.frombuffer(bytearray(sample[ext]), dtype=torch.uint8)
    return image, sample["txt"], sample.get("cls", b""), f"{sample['__shard__']}:-:{sample['__key__']}.{ext}"


def _collate(items):
    images, captions, classes, sources, reads = zip(*items)
    return PackedImages.pack(list(images)), list(captions), list(classes), list(sources), reads[-1]


def _arrays(values) -> list[np.ndarray]:
    return [np.frombuffer(v.encode() if isinstance(v, str) else v, dtype=np.uint8) for v in values]


class StreamReader:
    """What the DALI loader uses of DALI's reader pipeline (``run``, ``checkpoint``, ``reader_meta``,
    ``max_batch_size``), over worker streams: ``run`` gives the next batch of encoded images, captions (and for
    eval class labels) and sources; a reader built with ``checkpoint()``'s bytes goes on from there. An eval pass
    ends with this rank's last sample (``local_samples``), and the next ``run`` starts the next pass."""

    def __init__(self, shards: Shards, request: LoaderRequest, checkpoint: bytes | None = None):
        self.train, self.max_batch_size = request.train, request.options.batch_size
        self.skips = Skips(rank=request.rank)  # the workers pass every image on: DALI's decode finds bad ones
        self.streams = WorkerStreams(shards, request, transform=_encoded, collate=_collate, skips=self.skips,
                                     pin_memory=False)  # fmt: skip
        self.local_samples = self.streams.local_samples
        # how a restored stream differs from an uninterrupted one (None: it goes on exactly)
        self.differs = None if checkpoint is None else self.streams.restore(_position(checkpoint))
        self._batches, self._given = None, 0  # this pass's iterator, and the samples it gave (eval)

    def reader_meta(self, name: str) -> dict:
        return {"epoch_size": self.streams.samples_per_epoch}

    def checkpoint(self) -> bytes:
        return json.dumps(self.streams.position().state()).encode()

    def run(self) -> tuple:
        """The next batch read; an empty one where an eval pass ended short of ``local_samples`` (a shard that
        failed mid-read, skipped and logged by the stream), which ends that pass."""
        if self._batches is None:
            self._batches, self._given = iter(self.streams), 0
        try:
            packed, captions, classes, sources, _ = next(self._batches)
        except StopIteration:
            if self.train:  # a training stream is endless: its workers ended
                raise RuntimeError("the DataLoader workers' training stream ended") from None
            self._end_pass()
            return [], [], [], []
        self._given += len(captions)
        if not self.train and self._given >= self.local_samples:
            self._end_pass()  # its workers exit now, not at the next eval
        images = [t.numpy() for t in packed.unpack()]
        return images, _arrays(captions), *([] if self.train else [_arrays(classes)]), _arrays(sources)

    def _end_pass(self) -> None:
        if self._batches is not None:
            self._batches.close()  # the generator lets go of its DataLoader iterator, which ends the workers
        self._batches = None

    def close(self) -> None:
        """Stop the workers (a training stream's persist)."""
        self._end_pass()
        self.streams.close()


def _position(checkpoint: bytes) -> dict:
    """A stream reader's position from its checkpoint; ValueError for one DALI's own reader wrote (local shards),
    which the trainer takes as a stream that starts afresh, saying why."""
    try:
        return json.loads(checkpoint)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(
            "the position was saved by DALI's own reader (local shards), this run streams remote shards"
        ) from None
