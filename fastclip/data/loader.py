"""One entry for the data path: the DALI loader where DALI is installed, else the torch fallback."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from fastclip.config import ConfigError, DataConfig
from fastclip.model import ImageSpec


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


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
):
    """A loader for this rank's part of the train (``train``) or val shards, as ``data.loader`` says."""
    kind = data.loader
    if kind == "auto":
        kind = "dali" if dali_available() else "torch"
    if kind == "dali":
        if not dali_available():
            raise ConfigError("data.loader: 'dali' needs nvidia-dali (pip install nvidia-dali-cuda120), or use 'torch'")
        from fastclip.data.dali import build_loader as build
    else:
        from fastclip.data.torch_loader import TorchLoader as build
    return build(
        data=data, image=image, tokenizer=tokenizer, train=train, rank=rank, world_size=world_size, seed=seed,
        device=device,
    )  # fmt: skip
