"""DALI pipelines over webdataset shards: per-rank split, shuffle, decode, crop, normalize; captions tokenized.

On a GPU the JPEG decode runs on the device (``device="mixed"``, nvJPEG); on a CPU-only machine the same
pipeline runs with ``device_id=None``. A background thread runs the pipeline and the tokenizer one batch
ahead, so the training step finds the next batch ready; the images reach the step on its device.
"""

from __future__ import annotations

import queue
import tarfile
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from fastclip.config import DataConfig
from fastclip.data.batch import Batch
from fastclip.data.shards import index_paths, resolve_shards
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


def _has_labels(path: str) -> bool:
    """Whether a shard's first samples carry a KEY.cls (zero-shot label); read from the tar headers only."""
    with tarfile.open(path) as tar:
        for _, member in zip(range(64), tar):
            if member.name.endswith(".cls"):
                return True
    return False


def _reader(paths: list[str], exts: list[str], *, rank: int, world_size: int, shuffle: bool, data: DataConfig, seed):
    return fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths(paths),
        ext=exts,
        # a sample without an image or a caption is skipped, as open_clip's filter_no_caption_or_no_image does
        missing_component_behavior="skip",
        shard_id=rank,
        num_shards=world_size,
        random_shuffle=shuffle,
        initial_fill=data.shuffle_buffer,
        pad_last_batch=not shuffle,
        stick_to_shard=not shuffle,
        seed=seed,
        name="reader",
    )


def build_pipeline(
    *, data: DataConfig, image: ImageSpec, paths: list[str], train: bool, rank: int, world_size: int, seed: int
):
    """A built DALI pipeline yielding (images, caption bytes[, cls bytes]) for this rank's part of ``paths``."""
    device = _decode_device(data)
    device_id = torch.cuda.current_device() if device == "mixed" else None
    batch = data.batch_size
    labelled = not train and _has_labels(paths[0])

    @pipeline_def(
        batch_size=batch, num_threads=data.num_threads, device_id=device_id, seed=seed, prefetch_queue_depth=2
    )
    def pipeline():
        if train:
            jpg, txt = _reader(
                paths, ["jpg;jpeg;png", "txt"], rank=rank, world_size=world_size, shuffle=True, data=data, seed=seed
            )
            img = fn.decoders.image_random_crop(
                jpg,
                device=device,
                output_type=types.RGB,
                random_area=list(data.crop_scale),
                random_aspect_ratio=[3 / 4, 4 / 3],
                seed=seed,
            )
            img = fn.resize(img, resize_x=image.size, resize_y=image.size, interp_type=types.INTERP_CUBIC)
            return _normalize(img, image), txt
        exts = ["jpg;jpeg;png", "txt"] + (["cls"] if labelled else [])
        outputs = _reader(paths, exts, rank=rank, world_size=world_size, shuffle=False, data=data, seed=seed)
        img = fn.decoders.image(outputs[0], device=device, output_type=types.RGB)
        img = fn.resize(img, resize_shorter=image.size, interp_type=types.INTERP_CUBIC)
        return (_normalize(img, image, crop=(image.size, image.size)), *outputs[1:])

    pipe = pipeline()
    pipe.build()
    return pipe


def _to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


def _strings(tensor_list) -> list[str]:
    return [np.array(tensor_list[i]).tobytes().decode("utf-8", errors="replace") for i in range(len(tensor_list))]


def _labels(tensor_list) -> torch.Tensor:
    values = []
    for i in range(len(tensor_list)):
        raw = np.array(tensor_list[i]).tobytes().strip()
        values.append(int(raw) if raw else -1)
    return torch.tensor(values, dtype=torch.long)


class DaliLoader:
    """Iterates batches from a DALI pipeline; a thread keeps ``prefetch`` batches ready.

    A training loader never ends (the reader wraps epochs); ``samples_per_epoch`` says how many training
    samples one pass over all ranks holds. A validation loader yields each of this rank's samples exactly
    once per iteration, the reader's padding cut off.
    """

    def __init__(
        self,
        *,
        pipe,
        tokenizer: Callable[[list[str]], torch.Tensor],
        train: bool,
        rank: int,
        world_size: int,
        device: torch.device,
        prefetch: int = 2,
    ):
        self.pipe, self.tokenizer, self.train, self.device, self.prefetch = pipe, tokenizer, train, device, prefetch
        self.samples_per_epoch = pipe.reader_meta("reader")["epoch_size"]
        total = self.samples_per_epoch
        # DALI gives shard i the samples [total * i // n, total * (i + 1) // n)
        self.local_samples = total * (rank + 1) // world_size - total * rank // world_size
        self.batch_size = pipe.max_batch_size
        self.image_device = device if _is_gpu_pipe(pipe) else torch.device("cpu")

    def _produce(self, n_batches: int | None) -> Iterator[Batch]:
        remaining = self.local_samples
        produced = 0
        while n_batches is None or produced < n_batches:
            try:
                outputs = self.pipe.run()
            except RuntimeError as e:
                raise RuntimeError(
                    f"the DALI pipeline stopped: {e}\nA corrupt image in the shards stops DALI's decoder. Remove "
                    "that sample, or run with --data.loader torch, which skips such samples and logs each one."
                ) from e
            images = _to_torch(outputs[0], self.image_device)
            texts = self.tokenizer(_strings(outputs[1]))
            labels = _labels(outputs[2]) if len(outputs) > 2 else None
            if not self.train:
                keep = min(self.batch_size, remaining)
                remaining -= keep
                images, texts = images[:keep], texts[:keep]
                labels = labels[:keep] if labels is not None else None
            if texts.device.type == "cpu" and self.device.type == "cuda":
                texts = texts.pin_memory()
            yield Batch(images=images, texts=texts, labels=labels)
            produced += 1

    def __iter__(self) -> Iterator[Batch]:
        n_batches = None if self.train else -(-self.local_samples // self.batch_size)
        if n_batches == 0:
            return iter(())
        self._close_prefetcher()
        self._prefetcher = _Prefetcher(self._produce(n_batches), depth=self.prefetch, device=self.device)
        return self._prefetcher

    def _close_prefetcher(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def close(self) -> None:
        """Stop the prefetch thread, then free the pipeline (its C++ threads must not outlive the process)."""
        self._close_prefetcher()
        if getattr(self, "pipe", None) is not None:
            self.pipe = None


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
    field = "data.train_shards" if train else "data.val_shards"
    paths = resolve_shards(data.train_shards if train else data.val_shards, field=field)
    pipe = build_pipeline(data=data, image=image, paths=paths, train=train, rank=rank, world_size=world_size, seed=seed)
    return DaliLoader(pipe=pipe, tokenizer=tokenizer, train=train, rank=rank, world_size=world_size, device=device)
