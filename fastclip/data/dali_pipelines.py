"""DALI's two pipelines for the DALI loader (fastclip/data/dali.py), and reading their outputs.

The reader: this rank's part of the shards, shuffled for training, as encoded bytes (``fn.readers.webdataset``
splits the samples among ranks by position, whatever the shuffle). The decoder: images in through
``external_source``, decoded on the GPU with ``device="mixed"`` (nvJPEG) or on the CPU, random-resized-crop
(train) or resize + centre crop (eval), normalized as open_clip's preprocessing.
"""

from __future__ import annotations

import math

import numpy as np
import nvidia.dali.math as dmath
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import feed_ndarray

from fastclip.data.loader import LoaderOptions
from fastclip.data.tar_layout import IMAGE_EXTS, parse_label
from fastclip.model import ImageSpec


def _decode_device(options: LoaderOptions) -> str:
    if options.decode_device == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    return options.decode_device


def _normalize(images, spec: ImageSpec, crop: tuple[int, int] | None = None, pos=(0.5, 0.5)):
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        crop=crop,
        crop_pos_x=pos[0],
        crop_pos_y=pos[1],
        mean=[255.0 * m for m in spec.mean],
        std=[255.0 * s for s in spec.std],
    )


def _half_to_even(d):
    """``int(round(d / 2))`` of Python (halves to even), for an integral DALI value ``d``."""
    half = dmath.floor(d / 2)
    return half + (d - 2 * half) * (half - 2 * dmath.floor(half / 2))


def _resize_center_crop(img, spec: ImageSpec):
    """open_clip's eval transform, pixel for pixel up to the resampler's rounding (1-2 levels): torchvision's
    ``Resize(S)`` (shorter side to S, the longer to ``int(S * long / short)``, bicubic with antialias) and
    ``CenterCrop(S)`` (offset ``int(round((side - S) / 2))``). DALI's own ``resize_shorter`` and centred crop
    differ from both by a fraction of a pixel, enough for several intensity levels of error (a mean of 8)."""
    size = spec.size
    shape = img.shape(dtype=types.FLOAT)  # H, W, C
    h, w = shape[0], shape[1]
    short = dmath.min(h, w)
    new_h, new_w = dmath.floor(size * h / short), dmath.floor(size * w / short)
    img = fn.resize(img, resize_x=new_w, resize_y=new_h, interp_type=types.INTERP_CUBIC, antialias=True)
    dx, dy = new_w - size, new_h - size
    return _normalize(
        img, spec, crop=(size, size),
        pos=(_half_to_even(dx) / dmath.max(dx, 1), _half_to_even(dy) / dmath.max(dy, 1)),
    )  # fmt: skip


def _area_fractions(crop_scale, attempts: int):
    """``attempts`` area fractions uniform in ``crop_scale``. DALI's uniform refuses an empty range ('Invalid range
    [1, 1)') where torch's ``uniform_(lo, lo)`` gives ``lo``, so a fixed scale such as [1, 1] (the torch loader takes
    it) is that constant: the same draws as torchvision's."""
    lo, hi = crop_scale
    if lo == hi:
        return types.Constant(np.full(attempts, lo, dtype=np.float32))
    return fn.random.uniform(range=[lo, hi], shape=[attempts])


def _random_resized_crop(encoded, *, device: str, crop_scale, ratio=(3 / 4, 4 / 3), attempts: int = 10):
    """open_clip's ``RandomResizedCrop`` window (torchvision's sampler), decoded: up to ``attempts`` draws of an area
    fraction uniform in ``crop_scale`` and a log-uniform aspect ratio, the first that fits placed uniformly at
    random; when none fits, the whole image clipped to ``ratio``, centred. DALI's own ``image_random_crop`` draws
    alike but places that fallback at random, and at open_clip's default scale (0.9, 1) every photo wider than 4:3
    or taller than 3:4 falls back (no 4:3 window covers 0.9 of a 3:2 image). Measured with the KS distance of
    tests/test_preprocess_parity.py: crop centres 0.41 (3:2 image), 0.45 (5:8) and 0.49 (8:3) away from open_clip's
    with ``image_random_crop``, 0.00 with this sampler. A DALI graph has no loop: all the draws of a sample are made
    at once and the first that fits is picked arithmetically."""
    shape = fn.peek_image_shape(encoded, dtype=types.FLOAT, adjust_orientation=False)  # H, W, C as stored
    h_img, w_img = shape[0], shape[1]
    target = h_img * w_img * _area_fractions(crop_scale, attempts)
    aspect = dmath.exp(fn.random.uniform(range=[math.log(ratio[0]), math.log(ratio[1])], shape=[attempts]))
    w, h = dmath.floor(dmath.sqrt(target * aspect) + 0.5), dmath.floor(dmath.sqrt(target / aspect) + 0.5)
    fits = fn.cast((w > 0) & (w <= w_img) & (h > 0) & (h <= h_img), dtype=types.FLOAT)
    order = types.Constant(np.arange(attempts, dtype=np.float32)) + attempts * (1 - fits)  # misfits after fits
    first = fn.reductions.min(order)
    chosen = fn.cast(order == first, dtype=types.FLOAT)  # one-hot: the first draw that fits
    found = fn.cast(first < attempts, dtype=types.FLOAT)
    # torchvision's fallback: the whole image, or its centre at the nearest ratio in range if it is wider or taller
    w_fallback = dmath.min(w_img, dmath.floor(h_img * ratio[1] + 0.5))
    h_fallback = dmath.min(h_img, dmath.floor(w_img / ratio[0] + 0.5))
    w = found * fn.reductions.sum(w * chosen) + (1 - found) * w_fallback
    h = found * fn.reductions.sum(h * chosen) + (1 - found) * h_fallback
    # torch.randint(0, side - crop + 1) for a draw that fits, the floor of the half difference for the fallback
    x = found * dmath.min(dmath.floor(fn.random.uniform(range=[0, 1]) * (w_img - w + 1)), w_img - w)
    y = found * dmath.min(dmath.floor(fn.random.uniform(range=[0, 1]) * (h_img - h + 1)), h_img - h)
    x = x + (1 - found) * dmath.floor((w_img - w) / 2)
    y = y + (1 - found) * dmath.floor((h_img - h) / 2)
    return fn.decoders.image_slice(
        encoded, fn.stack(x, y), fn.stack(w, h), device=device, output_type=types.RGB,
        normalized_anchor=False, normalized_shape=False, adjust_orientation=False,
    )  # fmt: skip


def _reader(
    paths: list[str], index: list[str] | None, exts: list[str], *, rank: int, world_size: int, shuffle: bool,
    buffer: int, seed: int,
):  # fmt: skip
    return fn.readers.webdataset(
        paths=paths,
        index_paths=index,  # None: DALI reads every tar's headers first
        ext=exts,
        # a sample without an image or a caption is skipped, as open_clip's filter_no_caption_or_no_image does;
        # eval reads the optional KEY.cls too, and "skip" would drop every sample without one: there missing
        # parts come through empty and the loader drops image- or caption-less samples itself
        missing_component_behavior="skip" if shuffle else "empty",
        shard_id=rank,
        num_shards=world_size,
        random_shuffle=shuffle,
        initial_fill=buffer,
        pad_last_batch=not shuffle,
        stick_to_shard=not shuffle,
        seed=seed,
        name="reader",
    )


def reader_pipeline(
    *,
    options: LoaderOptions,
    paths: list[str],
    index: list[str] | None,
    train: bool,
    rank: int,
    world_size: int,
    seed: int,
    checkpoint: bytes | None = None,
):
    """This rank's encoded samples as DALI reads them: (image bytes, caption bytes[, cls bytes for eval], source
    info). With ``checkpoint`` (from ``pipe.checkpoint()``), it goes on from where that pipeline stood."""

    @pipeline_def(
        batch_size=options.batch_size, num_threads=options.workers, device_id=None, seed=seed, enable_checkpointing=True
    )
    def pipeline():
        # DALI matches extensions case-sensitively; the torch loader lower-cases them (KEY.JPG is common)
        images = ";".join([*IMAGE_EXTS, *(e.upper() for e in IMAGE_EXTS)])
        exts = [images, "txt"] + ([] if train else ["cls"])
        outputs = _reader(
            paths, index, exts, rank=rank, world_size=world_size, shuffle=train, buffer=options.shuffle_buffer,
            seed=seed,
        )  # fmt: skip
        return (*outputs, fn.get_property(outputs[0], key="source_info"))  # 'shard.tar:offset:key.jpg'

    pipe = pipeline(checkpoint=checkpoint)
    pipe.build()
    return pipe


def decode_pipeline(*, options: LoaderOptions, image: ImageSpec, train: bool, seed: int, batch_size: int | None = None):
    """Encoded images in (``external_source`` 'encoded'), model-ready float CHW images out: decode on the GPU
    where there is one, random-resized-crop for training, resize + centre crop for eval.

    One batch in flight (``prefetch_queue_depth=1``): the loader feeds a batch, schedules it, tokenizes that
    batch's captions while DALI decodes, then takes the images; a batch that fails is then known exactly.
    """
    device = _decode_device(options)
    device_id = torch.cuda.current_device() if device == "mixed" else None

    @pipeline_def(
        batch_size=batch_size or options.batch_size, num_threads=options.workers, device_id=device_id, seed=seed,
        prefetch_queue_depth=1,
    )  # fmt: skip
    def pipeline():
        encoded = fn.external_source(name="encoded", no_copy=False)
        if train:
            img = _random_resized_crop(encoded, device=device, crop_scale=options.crop_scale)
            img = fn.resize(img, resize_x=image.size, resize_y=image.size, interp_type=types.INTERP_CUBIC)
            return _normalize(img, image)
        img = fn.decoders.image(encoded, device=device, output_type=types.RGB, adjust_orientation=False)
        return _resize_center_crop(img, image)

    pipe = pipeline()
    pipe.build()
    return pipe


def to_torch(tensor_list, device: torch.device) -> torch.Tensor:
    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device) if device.type == "cuda" else None)
    return out


def strings(tensor_list, n: int) -> list[str]:
    return [np.array(tensor_list[i]).tobytes().decode("utf-8", errors="replace") for i in range(n)]


def labels(tensor_list, n: int, sources: list[str]) -> list[int]:
    return [parse_label(np.array(tensor_list[i]).tobytes(), where=sources[i]) for i in range(n)]


def reason(error: Exception) -> str:
    """The line of a DALI error that says what went wrong ('nvImageCodec failure: ...')."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Current pipeline", "Critical error", "Error in", "File"))]
    return useful[-1] if useful else (lines[-1] if lines else type(error).__name__)


def is_gpu_pipe(pipe) -> bool:
    return pipe.device_id is not None and pipe.device_id != types.CPU_ONLY_DEVICE_ID
