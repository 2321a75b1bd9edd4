"""What every rank checks before any process group, model or pipeline exists: the files a run names, and what
must fit in the run's length where the shards' counts give it.

Each check lives with the code that owns the file (shards: fastclip/data/shard_specs.py, a pretrained checkpoint:
fastclip/model.py, the DeepSpeed JSON: fastclip/engine.py, zero-shot lists: fastclip/eval.py, the folders it
writes: fastclip/run_folders.py); this module only asks them all, so that a mistake costs seconds rather than a
model build.
"""

from __future__ import annotations

from fastclip.config import Config
from fastclip.errors import ConfigError


def check_inputs(cfg: Config, *, world_size: int = 1) -> None:
    """Raise :class:`ConfigError` for the first file of ``cfg`` that is missing or unreadable, or for a run too short
    for what it must hold (fastclip/schedules.py's check_run_length)."""
    import torch

    from fastclip.data.build import loader_kind
    from fastclip.data.loader import LoaderOptions
    from fastclip.data.remote import names_remote
    from fastclip.engine import deepspeed_config
    from fastclip.eval import read_zeroshot_list
    from fastclip.model import check_pretrained_file
    from fastclip.run_folders import check_writable, written_folders
    from fastclip.schedules import check_run_length

    # DataLoader workers (the torch loader's; DALI's for remote shards) count samples by walking tar headers where no
    # index file counts them: walk them here, before any model (the loader reuses the walk), so that the run's length
    # is known; DALI's own reader counts local shards itself
    kind = loader_kind(cfg.data)
    options = LoaderOptions.of(cfg.data)
    train = None
    for name in ("train_shards", "val_shards"):
        if spec := getattr(cfg.data, name):
            count = kind == "torch" or names_remote(spec)
            shards = options.resolve(spec, field=f"data.{name}", train=name == "train_shards", count=count)
            train = shards if name == "train_shards" else train
    for name in ("zeroshot_classnames", "zeroshot_templates"):
        if path := getattr(cfg.data, name):
            read_zeroshot_list(path, field=f"data.{name}")
    if cfg.model.pretrained is not None:
        check_pretrained_file(cfg.model.pretrained)
    if cfg.eval.early_stop_patience and not (cfg.data.val_shards or cfg.data.demo):
        raise ConfigError("eval.early_stop_patience: needs a validation set; set data.val_shards")
    # a --deepspeed_config that disagrees fails here (on this machine's device: train.precision auto depends on it)
    deepspeed_config(cfg, world_size=world_size, cuda=torch.cuda.is_available())
    for field, folder in written_folders(cfg).items():  # a read-only mount found now, not at the first save
        check_writable(folder, field)
    samples, counted_from = _epoch_samples(cfg, train, kind)
    check_run_length(cfg, samples_per_epoch=samples, world_size=world_size, counted_from=counted_from)


def _epoch_samples(cfg: Config, train, kind: str) -> tuple[int | None, str]:
    """An epoch's samples as the train loader will count them (``train``: its resolved shards) and where from, where
    that is known before it is built: data.train_num_samples, the torch loader's counts, DALI's where every shard has
    an index file (DALI reads their counts; without them it walks the tar headers itself, after the model is built)."""
    from fastclip.data.remote import names_remote
    from fastclip.schedules import epoch_source

    if cfg.data.train_num_samples:
        return cfg.data.train_num_samples, "data.train_num_samples"
    dali_counts = kind == "dali" and not names_remote(cfg.data.train_shards or "")  # after the model, from tars
    if train is None or train.total is None or (dali_counts and None in train.index):
        return None, ""
    return train.total, epoch_source(train.counted_from)
