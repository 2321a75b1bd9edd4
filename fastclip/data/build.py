"""Which loader a run gets, built for one rank: DALI (fastclip/data/dali.py) where it is installed and a GPU
decodes, else the torch loader (fastclip/data/torch_loader.py). Above both loaders and the contract they keep
(fastclip/data/loader.py), so neither imports the other's module through it."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import torch

from fastclip.config import Config, DataConfig
from fastclip.console import say
from fastclip.data.loader import Loader, LoaderOptions, LoaderRequest, auto_threads
from fastclip.errors import ConfigError
from fastclip.model import ImageSpec


def with_threads(data: DataConfig, sharers: int) -> DataConfig:
    """``data`` with ``num_threads`` resolved (:func:`auto_threads`), saying what was chosen and why."""
    kind = "DALI threads" if loader_kind(data) == "dali" else "DataLoader workers"
    if data.num_threads:
        say(f"data: {data.num_threads} {kind} per rank (data.num_threads)")
        return data
    threads, why = auto_threads(sharers)
    say(f"data: {threads} {kind} per rank ({why})")
    return dataclasses.replace(data, num_threads=threads)


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def loader_kind(data: DataConfig) -> str:
    """'dali' or 'torch', as ``data.loader`` says; 'auto' is DALI where it is installed and there is a GPU to
    decode on (remote shards reach DALI's decoder from DataLoader workers, fastclip/data/dali_stream.py). On CPUs
    the torch loader is faster: DALI's CPU resize costs about 4 ms an image of a real photo's size, torchvision's
    under 0.5 (benchmarks/bench_data.py, photos: 1.08x open_clip's loader against 1.82x)."""
    if data.loader != "auto":
        return data.loader
    return "dali" if dali_available() and torch.cuda.is_available() else "torch"


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
) -> Loader:
    """A loader for this rank's part of the train (``train``) or val shards, as ``data.loader`` says. ``seed`` is
    the run's, the same on every rank: loaders derive their per-rank streams from it."""
    request = LoaderRequest(
        spec=data.train_shards if train else data.val_shards, field="data.train_shards" if train else "data.val_shards",
        options=LoaderOptions.of(data), image=image, tokenizer=tokenizer, train=train, rank=rank,
        world_size=world_size, seed=seed, device=device,
    )  # fmt: skip
    if loader_kind(data) == "dali":
        if not dali_available():
            raise ConfigError("data.loader: 'dali' needs nvidia-dali (pip install nvidia-dali-cuda120), or use 'torch'")
        from fastclip.data.dali import build_dali_loader as build  # imports DALI: only when it is the one asked for
    else:
        from fastclip.data.torch_loader import build_torch_loader as build
    return build(request)


def build_loaders(
    cfg: Config, *, rank: int, world_size: int, device: torch.device, image: ImageSpec,
    tokenizer: Callable[[list[str]], torch.Tensor],
) -> tuple[Loader, Loader | None]:  # fmt: skip
    """A run's train loader and its val loader (None without ``data.val_shards``) for one rank, evaluating at
    ``eval.batch_size``. The run's seed on every rank: the loaders split each epoch among ranks and draw per-rank
    seeds themselves."""
    common = dict(
        image=image, tokenizer=tokenizer, rank=rank, world_size=world_size, seed=cfg.train.seed, device=device
    )
    train = build_loader(data=cfg.data, train=True, **common)
    if not cfg.data.val_shards:
        return train, None
    eval_data = dataclasses.replace(cfg.data, batch_size=cfg.eval.batch_size or cfg.data.batch_size)
    return train, build_loader(data=eval_data, train=False, **common)
