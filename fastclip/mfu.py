"""How close a run is to the hardware: model FLOPs per training sample, the card's peak, and MFU.

FLOPs are counted once at start-up from the architecture itself: the open_clip model is built on the meta device
(no memory, no init) and one image and one caption go through ``encode_image`` / ``encode_text`` under torch's
``FlopCounterMode``, which counts every matmul, convolution and attention by its shapes (2 FLOPs a multiply-add).
A training sample costs 3x its forward (the backward computes gradients for activations and weights). This is
model FLOPs (MFU, as PaLM defines it): a contrastive step's replayed forwards and activation checkpointing's
recompute are not counted as useful work. At 224 px it gives ViT-B/32 44.33, ViT-B/16 123.26 and ViT-L/14 525.98
GFLOP per sample, open_clip's published profile times 3 (14.78, 41.09, 175.33 GFLOP forward). Patch dropout
counts the tokens kept (the model is counted in training mode); locked towers count as trained (the convention).

The peak is dense bf16 tensor-core throughput from the vendor's datasheets for known cards, or ``train.peak_tflops``
(a measured matmul rate is the more honest denominator: benchmarks/gpu_precheck.py measures it).
"""

from __future__ import annotations

import functools
import json

import torch

from fastclip.config import ModelConfig

# dense bf16 TFLOP/s (no sparsity) by the name torch reports; the first match wins, so specific names come first
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)


def train_flops_per_sample(model: ModelConfig) -> float:
    """Model FLOPs of one training sample (forward + backward, image and caption) of ``model``'s architecture."""
    import open_clip

    from fastclip.model import resolve_model_name

    name = resolve_model_name(model.name)
    size = model.force_image_size
    architecture = json.dumps(open_clip.get_model_config(name), sort_keys=True)  # a JSON file may change meanwhile
    return _counted(name, architecture, tuple(size) if isinstance(size, list) else size, model.patch_dropout)


@functools.lru_cache(maxsize=16)
def _counted(name: str, _architecture: str, force_image_size, patch_dropout: float) -> float:
    """Counted once a process per architecture (about 0.4 s for the tiny model: a sweep builds a trainer a setting)."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    from fastclip.model import _quiet_random_init

    with torch.device("meta"), _quiet_random_init():
        clip = open_clip.create_model(
            name, force_image_size=force_image_size, device="meta",
            force_patch_dropout=patch_dropout or None,  # in training mode: the tokens a step really sees
        )  # fmt: skip
    size = clip.visual.image_size
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    image = torch.empty(1, 3, *size, device="meta")
    text = torch.zeros(1, clip.context_length, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        clip.encode_image(image)
        clip.encode_text(text)
    return 3.0 * counter.get_total_flops()


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """The card's dense bf16 FLOP/s: ``train.peak_tflops`` if set, else the table's entry for this GPU; None on a
    CPU or an unknown card (then the logs carry no MFU)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def mfu(samples_per_second_per_gpu: float, flops_per_sample: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: the model FLOP/s one GPU sustains over its peak; None where the peak is unknown."""
    return samples_per_second_per_gpu * flops_per_sample / peak if peak else None


def peak_memory_gb(device: torch.device) -> float | None:
    """The device's most allocated memory since the last call (GB), then the count restarts; None on a CPU. Both
    read the caching allocator's host-side counters: no device sync."""
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return peak
