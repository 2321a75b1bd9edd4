"""The fallback loader: webdataset shards through a torch DataLoader, for machines without DALI.

It keeps the contract of ``fastclip.data.loader.Loader``, as the DALI loader does: a training loader never ends
and says how many samples an epoch holds; a validation loader yields each of this rank's samples once per pass.
Each worker runs a stream of its share of the samples (fastclip/data/shard_stream.py), shuffles them through a
buffer, decodes JPEGs with torchvision (on the CPU), crops, normalizes and tokenizes (here). With
``data.decode_device`` 'mixed' the workers hand over the JPEG bytes and the main process decodes the whole batch
on the GPU (torchvision.io.decode_jpeg(device='cuda'), nvJPEG), then crops.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from fastclip.data.batch import Batch, BatchCount, check_stream
from fastclip.data.loader import LoaderRequest, derive_seed
from fastclip.data.shard_specs import Shards
from fastclip.data.shard_stream import BadShards, Shard, ShardStream, bounds
from fastclip.data.skips import DataBroken, Skips, Undecodable
from fastclip.data.tar_layout import IMAGE_EXTS, parse_label
from fastclip.model import ImageSpec
from fastclip.preemption import worker_signals

JPEG_MAGIC = b"\xff\xd8\xff"


def _decode(data: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] from an image's bytes; :class:`Undecodable` for bytes that are not one."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:  # what torchvision's decoders raise for bad bytes
        raise Undecodable(str(e)) from None


_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None  # not on Windows


class _Transform:
    """Sample -> (image [3, S, S] float normalized, or for GPU decode the JPEG's bytes [n] or another format's
    decoded pixels [3, H, W], both uint8; tokens; label; 'shard:key')."""

    def __init__(self, *, image: ImageSpec, crop_scale, tokenizer, train: bool, gpu_decode: bool):
        self.image, self.crop_scale, self.tokenizer = image, crop_scale, tokenizer
        self.train, self.gpu_decode = train, gpu_decode

    def __call__(self, sample: dict):
        source = f"{sample['__shard__']}:{sample['__key__']}"
        label = parse_label(sample.get("cls", b""), where=source)
        tokens = self.tokenizer([sample["txt"].decode("utf-8", errors="replace")])[0]
        raw = next(sample[e] for e in IMAGE_EXTS if e in sample)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        if self.gpu_decode and raw[:3] == JPEG_MAGIC:  # nvJPEG decodes it after batching; the source names it
            return data, tokens, label, source
        image = _decode(data)
        if self.gpu_decode:  # PNG and WebP: decoded here, cropped on the GPU with the JPEGs
            return image, tokens, label, source
        return prepare(image, self.image, self.crop_scale, self.train), tokens, label, source


def prepare(img: torch.Tensor, image: ImageSpec, crop_scale, train: bool) -> torch.Tensor:
    """uint8 [3, H, W] -> normalized float [3, S, S]: random-resized crop (train) or resize + center crop (val)."""
    from torchvision.transforms import v2

    if train:
        geometry = v2.RandomResizedCrop(
            image.size, scale=crop_scale, ratio=(3 / 4, 4 / 3), interpolation=v2.InterpolationMode.BICUBIC
        )
    else:
        geometry = v2.Compose(
            [v2.Resize(image.size, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(image.size)]
        )
    if img.is_cuda:  # resampling uint8 on the GPU is not supported everywhere; float always is
        img = img.float()
    out = geometry(img)
    if out.is_floating_point():
        # open_clip resizes with PIL, which rounds to uint8 and clips bicubic's overshoot; float resampling does
        # neither. Against open_clip's pixels (tests/test_preprocess_parity.py) the float path was 0.25-0.32 levels
        # off on average and up to 15 at high-contrast edges; rounded and clipped, 0.08-0.19 and 6. The uint8 path
        # (CPU) resamples as PIL does: 0.001-0.005, no pixel over 1.
        out = out.round_().clamp_(0, 255)
    out = out.float().div_(255)
    mean = torch.tensor(image.mean, device=out.device).view(3, 1, 1)
    std = torch.tensor(image.std, device=out.device).view(3, 1, 1)
    return out.sub_(mean).div_(std)


class PackedImages(NamedTuple):
    """A batch's images for the GPU: every JPEG's bytes in one tensor (``data[offsets[i]:offsets[i + 1]]``) and the
    few other formats, decoded in the worker, by position. One tensor instead of one per sample: a worker hands
    each tensor to the main process as a file descriptor, and a batch of 512 passed one by one exhausted a
    1,024-descriptor limit (an emulation of the GPU machine's loader)."""

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
        """JPEG bytes [n] or decoded pixels [3, H, W] per position, views of ``data`` (no copy)."""
        bounds = self.offsets.tolist()
        return [self.decoded.get(i, self.data[lo:hi]) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]


def _collate(items):
    images, tokens, labels, sources, reads = zip(*items)
    gpu = images[0].dtype == torch.uint8  # to decode (or crop) on the GPU
    packed = PackedImages.pack(list(images)) if gpu else torch.stack(images)
    # a batch is one worker's consecutive items: its last says how far that worker's stream has read
    return packed, torch.stack(tokens), torch.tensor(labels, dtype=torch.long), list(sources), reads[-1]


class _Refill:
    """Keeps training batches full when samples are dropped after batching (a JPEG that fails the GPU decode):
    a short batch waits and is topped up from the next, so the contrastive batch never holds a duplicate."""

    def __init__(self, size: int):
        self.size = size
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def push(self, images: torch.Tensor, texts: torch.Tensor, labels: torch.Tensor) -> Iterator[tuple]:
        if not self.parts and len(images) == self.size:  # the usual case: nothing held back, nothing to copy
            yield images, texts, labels
            return
        self.parts.append((images, texts, labels))
        while sum(len(p[0]) for p in self.parts) >= self.size:
            joined = [torch.cat(field) for field in zip(*self.parts)]
            yield tuple(t[: self.size] for t in joined)
            rest = tuple(t[self.size :] for t in joined)
            self.parts = [rest] if len(rest[0]) else []


class TorchLoader:
    """The DALI loader's contract on a torch DataLoader (see the module doc)."""

    def __init__(self, shards: Shards, request: LoaderRequest):
        options, train, rank, world_size = request.options, request.train, request.rank, request.world_size
        image, device, tokenizer, seed = request.image, request.device, request.tokenizer, request.seed
        total = shards.total
        self.samples_per_epoch = options.train_num_samples if train and options.train_num_samples else total
        self.epoch_from = "data.train_num_samples" if self.samples_per_epoch != total else shards.counted_from
        self.batch_size, self.train, self.device, self.image = options.batch_size, train, device, image
        self.crop_scale = options.crop_scale
        self.gpu_decode = device.type == "cuda" and options.decode_device in ("auto", "mixed")
        # one count for this rank's workers and its GPU decode; three batches' worth in a row stop the run
        self._skips = Skips(rank=rank, shared=True, limit=3 * options.batch_size)
        transform = _Transform(
            image=image, crop_scale=options.crop_scale, tokenizer=tokenizer, train=train, gpu_decode=self.gpu_decode
        )
        counts = shards.samples or [None] * len(shards.paths)
        bad = BadShards(options.max_bad_fraction, shards=len(shards.paths))
        self.stream = stream = ShardStream(
            shards=[Shard(*s, policy=options.remote) for s in zip(shards.paths, counts, shards.index,
                                                                  shards.indexed_bytes)], train=train,
            rank=rank,
            world_size=world_size, seed=seed, shuffle_buffer=options.shuffle_buffer, transform=transform,
            skips=self._skips, bad=bad, resampled=train and options.resampled,
        )  # fmt: skip
        self._batches_taken = 0
        self.workers = self._workers(options.workers, total, world_size)
        slots = world_size * self.workers  # this rank's samples of an epoch: those of its workers' slots
        if total is None or self.samples_per_epoch != total:  # this rank's share of the epoch's length
            n = self.samples_per_epoch
            self.local_samples = n * (rank + 1) // world_size - n * rank // world_size
        else:  # its workers' slots: the same in every epoch
            mine = [bounds(total, slot, slots) for slot in range(rank * self.workers, (rank + 1) * self.workers)]
            self.local_samples = sum(hi - lo for lo, hi in mine)
        self._reads = [0] * self.workers  # samples each worker's stream has read: the position of a train batch
        self.loader = DataLoader(
            stream, batch_size=options.batch_size, num_workers=self.workers, collate_fn=_collate,
            pin_memory=device.type == "cuda", drop_last=train, persistent_workers=train, prefetch_factor=4,
            # the workers' crops: drawn apart on each rank (the process-wide RNG is seeded alike on every rank)
            generator=torch.Generator().manual_seed(derive_seed(seed, "worker crops", rank)),
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

    @property
    def skipped(self) -> int:
        return self._skips.count

    def restore(self, state: dict) -> str | None:
        """Go on from a train batch's position (``BatchCount.state()``); before the first iteration only. Returns
        how the stream may differ from an uninterrupted one, or None where it goes on exactly (up to the random
        crops, drawn afresh)."""
        check_stream(state, "torch")
        if state.get("workers") != self.workers:
            raise ValueError(f"the position was saved with {state.get('workers')} loader workers, now {self.workers}")
        self.stream.resume_batches, self.stream.batch_size = int(state["batches"]), self.batch_size
        self._batches_taken = int(state["batches"])
        reads = state.get("reads")
        self.stream.resume_reads = list(reads) if reads else None
        self._reads = [self.stream._consumed(s, self.workers) for s in range(self.workers)]
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

    def _decode_on_gpu(self, images: list[torch.Tensor], sources: list[str]) -> tuple[torch.Tensor, list[int] | None]:
        """JPEG bytes: one nvJPEG batch decode; other formats arrive decoded. Then crop/resize/normalize on the GPU.
        If a JPEG in the batch is corrupt, they are decoded one at a time and the bad ones are logged and counted;
        returns the images and, then, which were kept (None when all were)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        decoded: list[torch.Tensor | None] = [im.to(self.device) if im.dim() == 3 else None for im in images]
        jpegs = [i for i, im in enumerate(images) if im.dim() == 1]
        try:
            batch = (
                [] if not jpegs else decode_jpeg([images[i] for i in jpegs], mode=ImageReadMode.RGB, device=self.device)
            )
            for i, out in zip(jpegs, batch):
                decoded[i] = out
            self._skips.kept()
        except RuntimeError:
            for i in jpegs:
                try:
                    decoded[i] = decode_jpeg(images[i], mode=ImageReadMode.RGB, device=self.device)
                    self._skips.kept()
                except RuntimeError as e:
                    shard, _, key = sources[i].rpartition(":")
                    self._skips.skip(key=key, shard=shard, data=images[i].numpy().tobytes(), error=e)
        keep = [i for i, im in enumerate(decoded) if im is not None]
        if not keep:
            return torch.empty(0), keep
        prepared = torch.stack([prepare(decoded[i], self.image, self.crop_scale, self.train) for i in keep])
        return prepared, (None if len(keep) == len(images) else keep)

    def _from_workers(self) -> Iterator:
        try:
            yield from self.loader
        except DataBroken as e:
            raise DataBroken.from_worker(e) from None

    def __iter__(self) -> Iterator[Batch]:
        refill = _Refill(self.batch_size) if self.train else None
        for images, texts, labels, sources, reads in self._from_workers():
            self._batches_taken += 1
            self._reads[(self._batches_taken - 1) % self.workers] = reads  # workers hand over batches in turn
            if isinstance(images, PackedImages):
                images, keep = self._decode_on_gpu(images.unpack(), sources)
                if keep is not None:
                    if not keep:
                        continue
                    texts, labels = texts[keep], labels[keep]
            non_blocking = self.device.type == "cuda"
            full = refill.push(images, texts, labels) if refill else [(images, texts, labels)]
            for batch_images, batch_texts, batch_labels in full:
                yield Batch(
                    images=batch_images.to(self.device, non_blocking=non_blocking),
                    texts=batch_texts.to(self.device, non_blocking=non_blocking),
                    labels=None if self.train else batch_labels,  # -1 where a sample has no KEY.cls
                    position=self._position(refill) if self.train else None,
                )

    def _position(self, refill: _Refill) -> BatchCount:
        """Where the stream stands after the batch being handed over: ``refill`` still holds its leftovers."""
        held = max(sum(len(p[0]) for p in refill.parts) - self.batch_size, 0)
        return BatchCount(self._batches_taken, self.workers, tuple(self._reads), held)

    def close(self) -> None:
        self.loader = None


def build_torch_loader(request: LoaderRequest) -> TorchLoader:
    """The torch loader over ``spec``'s readable shards. It needs their counts only to evaluate and to size an
    epoch: from the index tool's files, else from walking their headers (which the start-up check did already;
    the walk is cached), or none for training with ``train_num_samples``."""
    return TorchLoader(request.shards(), request)
