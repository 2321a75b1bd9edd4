"""The DALI loader: a reader and a decoder pipeline (fastclip/data/dali_pipelines.py), the hand-over between them,
and the tokenizer, run one batch ahead by a thread (fastclip/data/prefetch.py).

The hand-over is where a corrupt image is cut out: DALI itself can only stop on one. The images reach the step
on its device.

Why one module: the loader's steps (read, check, recall and re-schedule after a skip, decode, hand over) and the
samples they pass between them are one state machine; the pipelines themselves live apart.
"""

from __future__ import annotations

import base64
import json
import random
import re
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fastclip.data.batch import Batch, DataPosition, check_stream
from fastclip.data.dali_pipelines import (
    decode_pipeline,
    is_gpu_pipe,
    reader_pipeline,
    reason,
    strings,
    to_torch,
)
from fastclip.data.dali_pipelines import labels as labels_of
from fastclip.data.dali_stream import StreamReader
from fastclip.data.loader import LoaderRequest, derive_seed
from fastclip.data.prefetch import Prefetcher
from fastclip.data.remote import names_remote
from fastclip.data.shard_specs import SLOW_WALK, Shards, resolve_shards, say_once
from fastclip.data.skips import DataBroken, Skips
from fastclip.errors import ConfigError


@dataclass
class _Encoded:
    """Samples read but not decoded, copied out of the reader's buffers (which DALI reuses a few runs later), so
    that a failed batch can still be examined image by image: ~0.4 ms per 256 JPEGs of 46 KB."""

    images: list[np.ndarray]
    captions: list[str]
    labels: list[int] | None
    sources: list[str]  # 'shard.tar:offset:key.jpg'
    positions: list[DataPosition]  # the stream's position after each sample

    def __len__(self) -> int:
        return len(self.captions)

    def pick(self, index) -> _Encoded:
        return _Encoded(
            [self.images[i] for i in index], [self.captions[i] for i in index],
            None if self.labels is None else [self.labels[i] for i in index], [self.sources[i] for i in index],
            [self.positions[i] for i in index],
        )  # fmt: skip

    def __add__(self, other: _Encoded) -> _Encoded:
        if not len(self):
            return other
        if not len(other):
            return self
        return _Encoded(
            self.images + other.images, self.captions + other.captions,
            None if self.labels is None else self.labels + other.labels, self.sources + other.sources,
            self.positions + other.positions,
        )  # fmt: skip

    @classmethod
    def empty(cls) -> _Encoded:
        return cls([], [], None, [], [])

    def split(self, n: int) -> tuple[_Encoded, _Encoded]:
        return self.pick(range(min(n, len(self)))), self.pick(range(n, len(self)))


@dataclass
class _Flow:
    """One pass of the producer: samples read but not scheduled, batches in the decoders, decoders free."""

    left: int | None  # eval: samples of this pass not read yet (None: a training stream, endless)
    free: deque
    carry: _Encoded = field(default_factory=_Encoded.empty)
    in_flight: deque = field(default_factory=deque)
    all_bad: int = 0  # batches in a row without an image that decodes


class DaliLoader:
    """Iterates batches from two DALI pipelines, a reader and a decoder; a thread keeps ``prefetch`` batches
    ready.

    A training loader never ends (the reader wraps epochs); ``samples_per_epoch`` says how many training
    samples one pass over all ranks holds. A validation loader yields each of this rank's samples exactly
    once per iteration, the reader's padding cut off.

    An image that does not decode is skipped, named in the log (shard and key) and counted (``skipped``): DALI
    stops a pipeline on such an image without saying which it was, so the loader decodes the failed batch's
    images one at a time to find it, rebuilds the decoder, and fills the batch from the next samples, so that
    every training batch keeps its size.
    """

    MAX_ALL_BAD = 3  # consecutive batches without one decodable image: the data is broken, not a sample
    IN_FLIGHT = 2  # decoders, one batch each: one decodes while the other's images are handed over

    def __init__(
        self,
        *,
        make_reader: Callable[[bytes | None], Any],
        make_decoder: Callable[[int], Any],
        make_checker: Callable[[], Any],
        tokenizer: Callable[[list[str]], torch.Tensor],
        train: bool,
        rank: int,
        world_size: int,
        device: torch.device,
        prefetch: int = 2,
    ):
        self.make_reader, self.make_decoder, self.make_checker = make_reader, make_decoder, make_checker
        self.reader, self._consumed_on_restore = make_reader(None), 0
        self.tokenizer, self.train, self.device, self.prefetch = tokenizer, train, device, prefetch
        self.rebuilds = 0
        self.decoders, self.checker = [make_decoder(i) for i in range(self.IN_FLIGHT)], None
        self.skips = Skips(rank=rank)
        self.samples_per_epoch = total = self.reader.reader_meta("reader")["epoch_size"]
        # a stream reader knows its share (its workers' slots); DALI gives shard i [total*i//n, total*(i+1)//n)
        formula = total * (rank + 1) // world_size - total * rank // world_size
        self.local_samples = getattr(self.reader, "local_samples", formula)
        self.batch_size = self.reader.max_batch_size
        self.image_device = device if is_gpu_pipe(self.decoders[0]) else torch.device("cpu")

    @property
    def skipped(self) -> int:
        return self.skips.count

    def _read(self, limit: int | None) -> tuple[_Encoded, int]:
        """The next read's samples, and how many the reader gave (eval: before image- or caption-less ones are
        dropped, which is what ``limit`` counts)."""
        checkpoint = self.reader.checkpoint() if self.train else b""  # ~0.06 ms
        try:
            out = self.reader.run()
        except DataBroken:  # a stream reader's workers: they skipped what they could, and say why they stopped
            raise
        except RuntimeError as e:
            raise DataBroken(_reader_stopped(e)) from None
        n = len(out[1]) if limit is None else min(len(out[1]), limit)  # eval: the reader's padding cut off
        sources = strings(out[-1], n)
        labels = labels_of(out[2], n, sources) if len(out) > 3 else None
        images = [np.array(out[0][i]) for i in range(n)]
        positions = [DataPosition(checkpoint, i + 1) for i in range(n)]
        read = _Encoded(images, strings(out[1], n), labels, sources, positions)
        if not self.train:  # the eval reader passes samples with a missing part through empty (see _reader)
            read = read.pick([i for i in range(n) if images[i].size and np.array(out[1][i]).size])
        if self._consumed_on_restore:  # the restored read's first samples were trained on before the checkpoint
            read, self._consumed_on_restore = read.split(self._consumed_on_restore)[1], 0
        return read, n

    def restore(self, state: dict[str, Any]) -> str | None:
        """Go on from a train batch's position (``DataPosition.state()``): the reader from its checkpoint, the
        samples it had consumed of that read dropped. Returns how the stream differs from an uninterrupted one
        (None: exactly the same). A stream reader also takes the torch loader's position on the same shards: both
        run the same worker streams (a run that read remote shards with the torch loader, resumed with DALI)."""
        if state.get("loader") == "torch" and isinstance(self.reader, StreamReader):
            state = DataPosition(json.dumps(state).encode(), 0).state()
        check_stream(state, "dali")
        self._close_prefetcher()
        old, self.reader = self.reader, self.make_reader(base64.b64decode(state["reader"]))
        getattr(old, "close", lambda: None)()
        self._consumed_on_restore = int(state["consumed"])
        return getattr(self.reader, "differs", None)

    def _undecodable(self, batch: _Encoded) -> dict[int, str]:
        """Which of ``batch``'s images DALI cannot decode, one image at a time, and why."""
        bad = {}
        for i, array in enumerate(batch.images):
            self.checker = self.checker or self.make_checker()
            try:
                self.checker.feed_input("encoded", [array])
                self.checker.schedule_run()
                self.checker.outputs()
            except RuntimeError as e:
                bad[i] = reason(e)
                self.checker = None  # a pipeline that failed is spent
        return bad

    def _take(self, slot: int) -> torch.Tensor | RuntimeError:
        """Decoder ``slot``'s images, or the error it stopped with, without its traceback: those frames hold the
        spent pipeline, whose threads must not outlive it (a loader worker forked later would inherit them)."""
        try:
            (images,) = self.decoders[slot].outputs()
            return to_torch(images, self.image_device)
        except RuntimeError as e:
            return e.with_traceback(None)

    def _skip(self, batch: _Encoded, error: RuntimeError, slot: int) -> _Encoded:
        """Log and drop the images of a failed batch that do not decode; the rest, to decode again."""
        bad = self._undecodable(batch)
        if not bad:
            raise RuntimeError(
                f"the DALI pipeline stopped: {error}\nEvery image of the failed batch decodes on its own, so this is "
                "not a corrupt sample; --data.loader torch runs without DALI."
            ) from error
        for i, why in bad.items():
            shard, _, name = batch.sources[i].rsplit(":", 2)
            self.skips.skip(key=name.rsplit(".", 1)[0], shard=shard, data=batch.images[i].tobytes(), error=why)
        self.rebuilds += 1
        self.decoders[slot] = self.make_decoder(len(self.decoders) + self.rebuilds)  # the failed one is spent
        return batch.pick([i for i in range(len(batch)) if i not in bad])

    def _produce(self) -> Iterator[Batch]:
        """Keep every decoder busy with one batch; hand over the oldest when its images are ready."""
        flow = _Flow(None if self.train else self.local_samples, deque(range(len(self.decoders))))
        while True:
            self._schedule(flow)
            if not flow.in_flight:
                return
            batch = self._hand_over(flow)
            if batch is not None:
                yield batch

    def _schedule(self, flow: _Flow) -> None:
        """Give each free decoder a batch of the samples read, reading more as needed."""
        while flow.free:
            while len(flow.carry) < self.batch_size and (flow.left is None or flow.left > 0):
                read, n = self._read(flow.left)
                # eval: a stream reader's pass that ended short (an empty read) ends here
                flow.left = None if flow.left is None else (flow.left - n if n else 0)
                flow.carry = flow.carry + read
            if not len(flow.carry):
                return
            batch, flow.carry = flow.carry.split(self.batch_size)
            slot = flow.free.popleft()
            self.decoders[slot].feed_input("encoded", batch.images)
            self.decoders[slot].schedule_run()
            flow.in_flight.append((slot, batch))

    def _recall(self, flow: _Flow) -> _Encoded:
        """The samples of the batches in flight behind a failed one, back to be scheduled after its good samples,
        their decode dropped (a rare cost): batches leave in read order, so each one's last sample is an exact
        position, every sample before it trained on or skipped."""
        recalled = _Encoded.empty()
        while flow.in_flight:
            slot, batch = flow.in_flight.popleft()
            images = self._take(slot)
            flow.free.append(slot)
            recalled = recalled + (self._skip(batch, images, slot) if isinstance(images, RuntimeError) else batch)
        return recalled

    def _hand_over(self, flow: _Flow) -> Batch | None:
        """The oldest scheduled batch, decoded and tokenized; None when its decode failed (its good samples go
        back to be scheduled again, ahead of the rest)."""
        slot, batch = flow.in_flight.popleft()
        texts = self.tokenizer(batch.captions)  # while the decoders work
        images = self._take(slot)
        flow.free.append(slot)
        if isinstance(images, RuntimeError):
            good = self._skip(batch, images, slot)
            flow.all_bad = 0 if len(good) else flow.all_bad + 1
            if flow.all_bad >= self.MAX_ALL_BAD:
                raise DataBroken(
                    f"{self.MAX_ALL_BAD} batches in a row held no image that decodes ({self.skipped} skipped on "
                    f"rank {self.skips.rank}): the data is broken, not a sample. Check the shards' image files."
                )
            flow.carry = good + self._recall(flow) + flow.carry
            return None
        flow.all_bad = 0
        labels = torch.tensor(batch.labels, dtype=torch.long) if batch.labels is not None else None
        if texts.device.type == "cpu" and self.device.type == "cuda":
            texts = texts.pin_memory()
        position = batch.positions[-1] if self.train else None
        return Batch(images=images, texts=texts, labels=labels, position=position)

    def __iter__(self) -> Iterator[Batch]:
        if not self.train and self.local_samples == 0:
            return iter(())
        self._close_prefetcher()
        self._prefetcher = Prefetcher(self._produce(), depth=self.prefetch, device=self.device)
        return self._prefetcher

    def _close_prefetcher(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def close(self) -> None:
        """Stop the prefetch thread, then free the pipelines (their C++ threads must not outlive the process)."""
        self._close_prefetcher()
        getattr(self.reader, "close", lambda: None)()  # a stream reader's DataLoader workers
        self.reader, self.decoders, self.checker = None, [], None


def _reader_stopped(error: RuntimeError) -> str:
    """One line for a DALI reader that stopped mid-run: a shard that changed, vanished or broke after start-up
    (which opens only some of them). DALI cannot leave it out and go on, so the run stops, saying how to fix it."""
    named = re.search(r'at "([^"]+)"', str(error))
    where = f" on {named.group(1)}" if named else ""
    return (
        f"the DALI reader stopped{where}: {reason(error)}. A shard changed, vanished or broke after start-up; DALI "
        "cannot skip it mid-run. Re-index it (python -m fastclip.data.shards index SHARD) or remove it from the "
        "spec, then --checkpoint.resume latest; --data.loader torch skips such a shard and goes on."
    )


def build_dali_loader(request: LoaderRequest) -> DaliLoader:
    """The DALI loader over ``spec``'s readable shards. DALI splits the samples among ranks by position whatever
    the shuffle, so each rank shuffles and crops with its own seed; resampled, each rank reads its own draw. Remote
    shards reach DALI's decoder from DataLoader workers (fastclip/data/dali_stream.py), counted as the torch loader
    counts them."""
    options, field, train, image, seed = request.options, request.field, request.train, request.image, request.seed
    rank, world_size = request.rank, request.world_size

    def loader(make_reader: Callable[[bytes | None], Any], epoch_from: str) -> DaliLoader:
        built = DaliLoader(
            make_reader=make_reader,
            # decoder i: the i-th built (the first ones, then each rebuild), so a rebuilt one draws other crops
            make_decoder=lambda i: decode_pipeline(
                options=options, image=image, train=train, seed=derive_seed(seed, "decoder crops", rank, i)
            ),
            make_checker=lambda: decode_pipeline(options=options, image=image, train=False, seed=0, batch_size=1),
            tokenizer=request.tokenizer, train=train, rank=rank, world_size=world_size, device=request.device,
        )  # fmt: skip
        built.epoch_from = epoch_from
        if train and options.train_num_samples:  # the epoch's length; the reader goes on through its own pass
            built.samples_per_epoch, built.epoch_from = options.train_num_samples, "data.train_num_samples"
        return built

    if names_remote(request.spec):
        shards = request.shards()
        return loader(lambda checkpoint: StreamReader(shards, request, checkpoint), shards.counted_from)
    shards = request.shards(count=False)  # DALI counts the samples itself

    def build(shards: Shards) -> DaliLoader:
        paths, index = _reader_shards(shards, field=field, resampled=train and options.resampled, seed=seed, rank=rank)
        ranks = (0, 1) if train and options.resampled else (rank, world_size)
        return loader(
            lambda checkpoint: reader_pipeline(
                options=options, paths=paths, index=index, train=train, rank=ranks[0], world_size=ranks[1],
                seed=derive_seed(seed, "reader shuffle", rank), checkpoint=checkpoint,
            ),
            f"DALI's count, from {'the index files' if index else 'the tar headers'}",
        )  # fmt: skip

    try:
        return build(shards)
    except RuntimeError as e:  # DALI's index inference stops on a tar damaged in the middle ("Invalid seek")
        # the start-up checks passed: open and walk every shard to find the damaged ones (else re-raise)
        checked = resolve_shards(
            request.spec, field=field, max_bad_fraction=options.max_bad_fraction, index_dir=options.index_dir,
            check=None, count=True,
        )  # fmt: skip
        if len(checked.paths) < len(shards.paths):
            return build(checked)
        if (samples := sum(checked.samples)) < world_size:  # DALI's "num_shards_ <= Size()"
            raise ConfigError(
                f"{field}: {samples} samples for {world_size} ranks, and every rank needs one at least. Add shards."
            ) from e
        raise


def _reader_shards(
    shards: Shards, *, field: str, resampled: bool, seed: int, rank: int
) -> tuple[list[str], list[str] | None]:
    """The tars this rank's reader reads, and their index files (DALI takes all or none). Resampled: as many
    shards as the set holds, drawn with replacement from this rank's stream (one reader pass, repeated)."""
    paths, index = shards.paths, shards.index
    if resampled:
        draw = random.Random(derive_seed(seed, "shard draws", rank)).choices(range(len(paths)), k=len(paths))
        paths, index = [paths[i] for i in draw], [index[i] for i in draw]
    if None not in index:
        return paths, index
    if len(shards.paths) > SLOW_WALK:
        missing = shards.index.count(None)
        say_once(
            field,
            f"{field}: {missing} of {len(shards.paths)} shards have no index file, so DALI reads every tar header "
            "of every shard before the first batch: this is what makes start-up slow. Run `python -m "
            "fastclip.data.shards index SHARDS` once (and --data.index_dir DIR if it wrote them elsewhere).",
        )
    return paths, None
