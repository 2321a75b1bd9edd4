"""The fallback loader: webdataset shards through a torch DataLoader, for machines without DALI.

It keeps the contract of ``fastclip.data.loader.Loader``, as the DALI loader does: a training loader never ends
and says how many samples an epoch holds; a validation loader yields each of this rank's samples once per pass.
Each worker (fastclip/data/workers.py) runs a stream of its share of the samples (fastclip/data/shard_stream.py),
shuffles them through a buffer, decodes JPEGs with torchvision (on the CPU), crops, normalizes and tokenizes
(here). With ``data.decode_device`` 'mixed' the workers hand over the JPEG bytes and the main process decodes the
whole batch on the GPU (torchvision.io.decode_jpeg(device='cuda'), nvJPEG), then crops.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastclip.data.batch import Batch, BatchCount
from fastclip.data.loader import LoaderRequest
from fastclip.data.shard_specs import Shards
from fastclip.data.skips import Skips, Undecodable
from fastclip.data.tar_layout import IMAGE_EXTS, parse_label
from fastclip.data.workers import PackedImages, WorkerStreams
from fastclip.model import ImageSpec

JPEG_MAGIC = b"\xff\xd8\xff"


def _decode(data: torch.Tensor) -> torch.Tensor:
    """uint8 [3, H, W] from an image's bytes; :class:`Undecodable` for bytes that are not one."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError, OSError) as e:  # what torchvision's decoders raise for bad bytes
        raise Undecodable(str(e)) from None


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
        options, train, device = request.options, request.train, request.device
        self.batch_size, self.train, self.device, self.image = options.batch_size, train, device, request.image
        self.crop_scale = options.crop_scale
        self.gpu_decode = device.type == "cuda" and options.decode_device in ("auto", "mixed")
        # one count for this rank's workers and its GPU decode; three batches' worth in a row stop the run
        self._skips = Skips(rank=request.rank, shared=True, limit=3 * options.batch_size)
        transform = _Transform(
            image=request.image, crop_scale=options.crop_scale, tokenizer=request.tokenizer, train=train,
            gpu_decode=self.gpu_decode,
        )  # fmt: skip
        self.streams = WorkerStreams(
            shards, request, transform=transform, collate=_collate, skips=self._skips, pin_memory=device.type == "cuda"
        )
        self.samples_per_epoch, self.epoch_from = self.streams.samples_per_epoch, self.streams.epoch_from
        self.workers, self.local_samples = self.streams.workers, self.streams.local_samples

    @property
    def skipped(self) -> int:
        return self._skips.count

    def restore(self, state: dict) -> str | None:
        """Go on from a train batch's position (:meth:`WorkerStreams.restore`)."""
        return self.streams.restore(state)

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

    def __iter__(self) -> Iterator[Batch]:
        refill = _Refill(self.batch_size) if self.train else None
        for images, texts, labels, sources, _ in self.streams:
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
        return self.streams.position(held=max(sum(len(p[0]) for p in refill.parts) - self.batch_size, 0))

    def close(self) -> None:
        self.streams.close()


def build_torch_loader(request: LoaderRequest) -> TorchLoader:
    """The torch loader over ``spec``'s readable shards. It needs their counts only to evaluate and to size an
    epoch: from the index tool's files, else from walking their headers (which the start-up check did already;
    the walk is cached), or none for training with ``train_num_samples``."""
    return TorchLoader(request.shards(), request)
