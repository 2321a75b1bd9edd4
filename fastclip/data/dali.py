"""DALI pipelines over webdataset shards: per-rank split, shuffle, decode, crop, normalize; captions tokenized.

Two pipelines: a reader (this rank's part of the shards, shuffled, as encoded bytes) and a decoder (JPEG decode
on the GPU with ``device="mixed"``, nvJPEG; on a CPU-only machine the same ops with ``device_id=None``). The
hand-over between them is where a corrupt image is cut out: DALI itself can only stop on one. A background
thread runs both and the tokenizer one batch ahead, so the training step finds the next batch ready; the
images reach the step on its device.
"""

from __future__ import annotations

import base64
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from fastclip.config import ConfigError, DataConfig
from fastclip.data.batch import Batch, DataPosition
from fastclip.data.shards import IMAGE_EXTS, index_paths, resolve_shards
from fastclip.data.skips import DataBroken, Skips
from fastclip.model import ImageSpec


def _decode_device(data: DataConfig) -> str:
    if data.decode_device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    return data.decode_device


def _normalize(images, spec: ImageSpec, crop: tuple[int, int] | None = None):
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        crop=crop,
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
    )


def _reader(paths: list[str], exts: list[str], *, rank: int, world_size: int, shuffle: bool, data: DataConfig, seed):
    return fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths(paths),
        ext=exts,
        # a sample without an image or a caption is skipped, as open_clip's filter_no_caption_or_no_image does;
        # eval reads the optional KEY.cls too, and "skip" would drop every sample without one: there missing
        # parts come through empty and the loader drops image- or caption-less samples itself
        missing_component_behavior="skip" if shuffle else "empty",
        shard_id=rank,
        num_shards=world_size,
        random_shuffle=shuffle,
        initial_fill=data.shuffle_buffer,
        pad_last_batch=not shuffle,
        stick_to_shard=not shuffle,
        seed=seed,
        name="reader",
    )


def reader_pipeline(
    *,
    data: DataConfig,
    paths: list[str],
    train: bool,
    rank: int,
    world_size: int,
    seed: int,
    checkpoint: bytes | None = None,
):
    """This rank's encoded samples as DALI reads them: (image bytes, caption bytes[, cls bytes for eval], source
    info). With ``checkpoint`` (from ``pipe.checkpoint()``), it goes on from where that pipeline stood."""

    @pipeline_def(
        batch_size=data.batch_size, num_threads=data.num_threads, device_id=None, seed=seed, enable_checkpointing=True
    )
    def pipeline():
        # DALI matches extensions case-sensitively; the torch loader lower-cases them (KEY.JPG is common)
        images = ";".join([*IMAGE_EXTS, *(e.upper() for e in IMAGE_EXTS)])
        exts = [images, "txt"] + ([] if train else ["cls"])
        outputs = _reader(paths, exts, rank=rank, world_size=world_size, shuffle=train, data=data, seed=seed)
        return (*outputs, fn.get_property(outputs[0], key="source_info"))  # 'shard.tar:offset:key.jpg'

    pipe = pipeline(checkpoint=checkpoint)
    pipe.build()
    return pipe


def decode_pipeline(*, data: DataConfig, image: ImageSpec, train: bool, seed: int, batch_size: int | None = None):
    """Encoded images in (``external_source`` 'encoded'), model-ready float CHW images out: decode on the GPU
    where there is one, random-resized-crop for training, resize + centre crop for eval.

    One batch in flight (``prefetch_queue_depth=1``): the loader feeds a batch, schedules it, tokenizes that
    batch's captions while DALI decodes, then takes the images; a batch that fails is then known exactly.
    """
    device = _decode_device(data)
    device_id = torch.cuda.current_device() if device == "mixed" else None

    @pipeline_def(
        batch_size=batch_size or data.batch_size, num_threads=data.num_threads, device_id=device_id, seed=seed,
        prefetch_queue_depth=1,
    )  # fmt: skip
    def pipeline():
        encoded = fn.external_source(name="encoded", no_copy=False)
        if train:
            img = fn.decoders.image_random_crop(
                encoded,
                device=device,
                output_type=types.RGB,
                random_area=list(data.crop_scale),
                random_aspect_ratio=[3 / 4, 4 / 3],
                seed=seed,
            )
            img = fn.resize(img, resize_x=image.size, resize_y=image.size, interp_type=types.INTERP_CUBIC)
            return _normalize(img, image)
        img = fn.decoders.image(encoded, device=device, output_type=types.RGB)
        img = fn.resize(img, resize_shorter=image.size, interp_type=types.INTERP_CUBIC)
        return _normalize(img, image, crop=(image.size, image.size))

    pipe = pipeline()
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


def _strings(tensor_list, n: int) -> list[str]:
    return [np.array(tensor_list[i]).tobytes().decode("utf-8", errors="replace") for i in range(n)]


def _labels(tensor_list, n: int) -> list[int]:
    values = []
    for i in range(n):
        raw = np.array(tensor_list[i]).tobytes().strip()
        values.append(int(raw) if raw else -1)
    return values


def _reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong ('nvImageCodec failure: ...')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Current pipeline", "Critical error", "Error in", "File"))]
    return useful[-1] if useful else (lines[-1] if lines else type(error).__name__)


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

    def split(self, n: int) -> tuple[_Encoded, _Encoded]:
        return self.pick(range(min(n, len(self)))), self.pick(range(n, len(self)))


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
        self.samples_per_epoch = self.reader.reader_meta("reader")["epoch_size"]
        total = self.samples_per_epoch
        # DALI gives shard i the samples [total * i // n, total * (i + 1) // n)
        self.local_samples = total * (rank + 1) // world_size - total * rank // world_size
        self.batch_size = self.reader.max_batch_size
        self.image_device = device if _is_gpu_pipe(self.decoders[0]) else torch.device("cpu")

    @property
    def skipped(self) -> int:
        return self.skips.count

    def _read(self, limit: int | None) -> tuple[_Encoded, int]:
        """The next read's samples, and how many the reader gave (eval: before image- or caption-less ones are
        dropped, which is what ``limit`` counts)."""
        checkpoint = self.reader.checkpoint() if self.train else b""  # ~0.06 ms
        out = self.reader.run()
        n = len(out[1]) if limit is None else min(len(out[1]), limit)  # eval: the reader's padding cut off
        labels = _labels(out[2], n) if len(out) > 3 else None
        images = [np.array(out[0][i]) for i in range(n)]
        positions = [DataPosition(checkpoint, i + 1) for i in range(n)]
        read = _Encoded(images, _strings(out[1], n), labels, _strings(out[-1], n), positions)
        if not self.train:  # the eval reader passes samples with a missing part through empty (see _reader)
            read = read.pick([i for i in range(n) if images[i].size and np.array(out[1][i]).size])
        if self._consumed_on_restore:  # the restored read's first samples were trained on before the checkpoint
            read, self._consumed_on_restore = read.split(self._consumed_on_restore)[1], 0
        return read, n

    def restore(self, state: dict[str, Any]) -> None:
        """Go on from a train batch's position (``DataPosition.state()``): the reader from its checkpoint, the
        samples it had consumed of that read dropped."""
        if state.get("loader") != "dali":
            raise ValueError(f"the position was saved by the {state.get('loader')} loader, this is DALI")
        self._close_prefetcher()
        self.reader = self.make_reader(base64.b64decode(state["reader"]))
        self._consumed_on_restore = int(state["consumed"])

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
                bad[i] = _reason(e)
                self.checker = None  # a pipeline that failed is spent
        return bad

    def _take(self, slot: int) -> torch.Tensor | RuntimeError:
        """Decoder ``slot``'s images, or the error it stopped with, without its traceback: those frames hold the
        spent pipeline, whose threads must not outlive it (a loader worker forked later would inherit them)."""
        try:
            (images,) = self.decoders[slot].outputs()
            return _to_torch(images, self.image_device)
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
        for i, reason in bad.items():
            shard, _, name = batch.sources[i].rsplit(":", 2)
            self.skips.skip(key=name.rsplit(".", 1)[0], shard=shard, data=batch.images[i].tobytes(), error=reason)
        self.rebuilds += 1
        self.decoders[slot] = self.make_decoder(len(self.decoders) + self.rebuilds)  # the failed one is spent
        return batch.pick([i for i in range(len(batch)) if i not in bad])

    def _produce(self) -> Iterator[Batch]:
        """Keep every decoder busy with one batch; hand over the oldest when its images are ready."""
        left = None if self.train else self.local_samples  # eval: samples of this pass not read yet
        carry = _Encoded([], [], None, [], [])
        in_flight: deque[tuple[int, _Encoded]] = deque()
        free = deque(range(len(self.decoders)))
        all_bad = 0
        while True:
            while free:
                while len(carry) < self.batch_size and (left is None or left > 0):
                    read, n = self._read(left)
                    left = None if left is None else left - n
                    carry = carry + read
                if not len(carry):
                    break
                batch, carry = carry.split(self.batch_size)
                slot = free.popleft()
                self.decoders[slot].feed_input("encoded", batch.images)
                self.decoders[slot].schedule_run()
                in_flight.append((slot, batch))
            if not in_flight:
                return
            slot, batch = in_flight.popleft()
            texts = self.tokenizer(batch.captions)  # while the decoders work
            images = self._take(slot)
            if isinstance(images, RuntimeError):
                good = self._skip(batch, images, slot)
                all_bad = 0 if len(good) else all_bad + 1
                if all_bad >= self.MAX_ALL_BAD:
                    raise DataBroken(
                        f"{self.MAX_ALL_BAD} batches in a row held no image that decodes ({self.skipped} skipped on "
                        f"rank {self.skips.rank}): the data is broken, not a sample. Check the shards' image files."
                    )
                carry = good + carry
                free.append(slot)
                continue
            free.append(slot)
            all_bad = 0
            labels = torch.tensor(batch.labels, dtype=torch.long) if batch.labels is not None else None
            if texts.device.type == "cpu" and self.device.type == "cuda":
                texts = texts.pin_memory()
            position = batch.positions[-1] if self.train else None
            yield Batch(images=images, texts=texts, labels=labels, position=position)

    def __iter__(self) -> Iterator[Batch]:
        if not self.train and self.local_samples == 0:
            return iter(())
        self._close_prefetcher()
        self._prefetcher = _Prefetcher(self._produce(), depth=self.prefetch, device=self.device)
        return self._prefetcher

    def _close_prefetcher(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def close(self) -> None:
        """Stop the prefetch thread, then free the pipelines (their C++ threads must not outlive the process)."""
        self._close_prefetcher()
        self.reader, self.decoders, self.checker = None, [], None


def _is_gpu_pipe(pipe) -> bool:
    return pipe.device_id is not None and pipe.device_id != types.CPU_ONLY_DEVICE_ID


class _Prefetcher:
    """Runs a batch generator in a daemon thread, ``depth`` batches ahead; re-raises its errors in the reader."""

    _DONE = object()

    def __init__(self, source: Iterator[Batch], *, depth: int, device: torch.device):
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.device = device
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="fastclip-prefetch")
        self.thread.start()

    def _run(self, source: Iterator[Batch]) -> None:
        try:
            for item in source:
                if self.stopped.is_set():
                    return
                while not self.stopped.is_set():
                    try:
                        self.queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the consumer, which re-raises it with its traceback
            self.queue.put(e)
            return
        if not self.stopped.is_set():
            self.queue.put(self._DONE)

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        item = self.queue.get()
        if item is self._DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        non_blocking = self.device.type == "cuda"
        return Batch(
            images=item.images.to(self.device, non_blocking=non_blocking),
            texts=item.texts.to(self.device, non_blocking=non_blocking),
            labels=item.labels,
            position=item.position,
        )

    def close(self) -> None:
        """Stop producing and wait for the thread, so nothing runs the pipeline after this returns."""
        self.stopped.set()
        while self.thread.is_alive():
            try:  # unblock a producer waiting on a full queue
                self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.05)


def build_loader(
    *,
    data: DataConfig,
    image: ImageSpec,
    tokenizer: Callable[[list[str]], torch.Tensor],
    train: bool,
    rank: int,
    world_size: int,
    seed: int,
    device: torch.device,
) -> DaliLoader:
    """``seed`` is the run's, the same on every rank. DALI splits the samples among ranks by position whatever
    the shuffle, so each rank shuffles and crops with its own seed."""
    field = "data.train_shards" if train else "data.val_shards"
    spec = data.train_shards if train else data.val_shards
    paths = resolve_shards(spec, field=field, max_bad_fraction=data.max_bad_fraction).paths
    seed = seed * 1009 + rank

    def build(paths: list[str]) -> DaliLoader:
        return DaliLoader(
            make_reader=lambda checkpoint: reader_pipeline(
                data=data, paths=paths, train=train, rank=rank, world_size=world_size, seed=seed, checkpoint=checkpoint
            ),
            # a rebuilt decoder draws other crops than the one it replaces
            make_decoder=lambda rebuilds: decode_pipeline(
                data=data, image=image, train=train, seed=seed + 7919 * rebuilds
            ),
            make_checker=lambda: decode_pipeline(data=data, image=image, train=False, seed=seed, batch_size=1),
            tokenizer=tokenizer, train=train, rank=rank, world_size=world_size, device=device,
        )  # fmt: skip

    try:
        return build(paths)
    except RuntimeError as e:  # DALI's index inference stops on a tar damaged in the middle ("Invalid seek")
        # the cheap end check passed them all: walk every header to find the damaged ones (else re-raise)
        shards = resolve_shards(spec, field=field, max_bad_fraction=data.max_bad_fraction, count=True)
        if len(shards.paths) < len(paths):
            return build(shards.paths)
        if (samples := sum(shards.samples)) < world_size:  # DALI's "num_shards_ <= Size()"
            raise ConfigError(
                f"{field}: {samples} samples for {world_size} ranks, and every rank needs one at least. Add shards."
            ) from e
        raise
