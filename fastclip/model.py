"""open_clip models by architecture name or model-config JSON, and AdamW parameter groups for them."""

from __future__ import annotations

import contextlib
import logging
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastclip.config import ModelConfig
from fastclip.console import say
from fastclip.errors import ConfigError


@dataclass(frozen=True)
class ImageSpec:
    size: int  # square side fed to the model
    mean: Sequence[float]  # per-channel, in [0, 1] units (open_clip's preprocess_cfg)
    std: Sequence[float]


SCALAR_PARAMS = ("logit_scale", "logit_bias")  # 0-dim parameters of open_clip models
_BUILTIN_CONFIGS = Path(__file__).parent / "model_configs"
_registered = False
_RANDOM_INIT = "No pretrained weights loaded for model"  # open_clip's create_model, with no pretrained= given


def check_pretrained_file(path: str) -> None:
    """A file torch.load or safetensors can read, by its first bytes: a zip (torch.save), a pickle (older torch)
    or a safetensors header; anything else would fail deep in unpickling with advice that does not apply."""
    if not Path(path).is_file():
        raise ConfigError(f"model.pretrained: no such file {path!r} (only local files are loaded)")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.endswith(".safetensors") or head.startswith((b"PK\x03\x04", b"\x80")):
        return
    raise ConfigError(
        f"model.pretrained: {path!r} is not a torch checkpoint file (it starts with {head.hex(' ')}); give a file "
        "written by torch.save (a state_dict or {'state_dict': ...}) or a .safetensors file"
    )


def resolve_model_name(name: str) -> str:
    """The open_clip registry name for ``name``: an architecture, a shipped fastclip config, or a JSON path."""
    import open_clip

    global _registered
    if not _registered:
        open_clip.add_model_config(_BUILTIN_CONFIGS)
        _registered = True
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model.name: model-config JSON {name!r} does not exist")
        open_clip.add_model_config(path)
        return path.stem
    if name not in open_clip.list_models():
        import difflib

        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        hint = f" Close: {', '.join(close)}." if close else ""
        raise ConfigError(f"model.name: {name!r} is not an open_clip architecture nor a .json model config.{hint}")
    return name


@contextlib.contextmanager
def _quiet_random_init():
    """Hide open_clip's "Model initialized randomly" warning, untrue once the pretrained file is loaded after it."""

    def keep(record: logging.LogRecord) -> bool:
        return _RANDOM_INIT not in record.getMessage()

    root = logging.getLogger()  # open_clip warns with logging.warning(), on the root logger
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _one_line(error: Exception, limit: int = 400) -> str:
    """An exception as one line: load_state_dict lists every key on its own line, unpickling adds advice about
    weights_only that does not apply to a file that is not a checkpoint at all."""
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in str(error):
        return f"it is not a torch checkpoint file ({type(error).__name__})"
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:limit]}{' ...' if len(text) > limit else ''}"


SIGLIP_INIT = {"init_logit_scale": math.log(10), "init_logit_bias": -10.0}  # open_clip_train's --siglip


def build_model(model: ModelConfig, *, siglip: bool = False) -> torch.nn.Module:
    """An fp32 open_clip CLIP model on the CPU that returns a dict of features and the logit scale (and bias).

    ``siglip``: trained with the sigmoid loss, so the model needs a logit bias; an architecture without one gets
    open_clip_train's ``--siglip`` initialization (logit scale log 10, bias -10), as open_clip would build it."""
    import open_clip

    name = resolve_model_name(model.name)
    quiet = _quiet_random_init() if model.pretrained is not None else contextlib.nullcontext()
    has_bias = (open_clip.get_model_config(name) or {}).get("init_logit_bias") is not None
    extra = SIGLIP_INIT if siglip and not has_bias else {}
    with quiet:
        clip = open_clip.create_model(
            name, force_image_size=model.force_image_size, output_dict=True,
            force_patch_dropout=model.patch_dropout or None,  # active in training mode only (PatchDropout)
            **extra,
        )  # fmt: skip
    if model.pretrained is not None:
        try:
            open_clip.load_checkpoint(clip, model.pretrained)
        except Exception as e:  # torch.load's unpickling errors, load_state_dict's key lists, a file of another shape
            said = _one_line(e)
            raise ConfigError(f"model.pretrained: {model.pretrained!r} does not load into {name}: {said}") from e
        # strict loading: every tensor of the model came from the file
        say(f"fastclip: loaded {len(clip.state_dict())} tensors from {model.pretrained} into {name}")
    _lock_and_checkpoint(clip, model)
    for attr in SCALAR_PARAMS:
        param = getattr(clip, attr, None)
        if isinstance(param, torch.nn.Parameter) and param.ndim == 0:
            # DeepSpeed broadcasts parameters as byte views, impossible for a 0-dim bf16 tensor: hold them as [1]
            setattr(clip, attr, torch.nn.Parameter(param.detach().reshape(1)))
    return clip


def _lock_and_checkpoint(clip: torch.nn.Module, model: ModelConfig) -> None:
    """open_clip's tower locks (after any pretrained weights load: LiT freezes trained towers) and activation
    checkpointing. A locked parameter has requires_grad False, so param_groups leaves it out of the optimizer."""
    try:
        if model.lock_image:
            clip.lock_image_tower(unlocked_groups=model.lock_image_unlocked_groups,
                                  freeze_bn_stats=model.lock_image_freeze_bn_stats)  # fmt: skip
        if model.lock_text:
            clip.lock_text_tower(unlocked_layers=model.lock_text_unlocked_layers,
                                 freeze_layer_norm=model.lock_text_freeze_layer_norm)  # fmt: skip
    except (AssertionError, AttributeError, NotImplementedError) as e:
        said = _one_line(e) or type(e).__name__
        raise ConfigError(f"model.lock_image / model.lock_text on {model.name}: {said}") from None
    if model.grad_checkpointing:
        clip.set_grad_checkpointing(True)


MAX_LOGIT_SCALE = 100.0  # open_clip clamps exp(logit_scale) to 100


def logit_scale_of(out: dict[str, torch.Tensor]) -> torch.Tensor:
    """exp(logit_scale) from a model output, fp32, 0-dim, clamped at 100.

    Clamped in the forward rather than in place after the step: the same loss and gradient as open_clip's
    clamp_, and it holds for ZeRO-partitioned and low-precision master weights alike.
    """
    return out["logit_scale"].float().reshape(()).clamp(max=MAX_LOGIT_SCALE)


def loss_scalars(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss's scalar inputs from a model output, fp32 and 0-dim, in the order the losses take them:
    ``logit_scale`` (exp, clamped) and, for a model with one (SigLIP), ``logit_bias``."""
    scalars = {"logit_scale": logit_scale_of(out)}
    if out.get("logit_bias") is not None:
        scalars["logit_bias"] = out["logit_bias"].float().reshape(())
    return scalars


def open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with the scalar parameters back in open_clip's 0-dim shape."""
    return {k: (v.reshape(()) if k in SCALAR_PARAMS and v.numel() == 1 else v) for k, v in state.items()}


def image_spec(clip: torch.nn.Module) -> ImageSpec:
    import open_clip

    cfg = open_clip.get_model_preprocess_cfg(clip)
    size = cfg["size"]
    size = size[0] if isinstance(size, (tuple, list)) else size
    return ImageSpec(size=int(size), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # open_clip's rule: biases, norm gains (all 1-d), embeddings and the logit scale/bias are not decayed
    return param.ndim < 2 or any(key in name for key in ("bn", "ln", "bias", "logit_scale", "embedding"))


def param_group_names(clip: torch.nn.Module) -> list[list[str]]:
    """The parameter names of :func:`param_groups`' groups, in their order (which names an optimizer's tensors)."""
    decay, no_decay = [], []
    for name, param in clip.named_parameters():
        if param.requires_grad:
            (no_decay if _no_decay(name, param) else decay).append(name)
    return [decay, no_decay]


def param_groups(clip: torch.nn.Module, *, weight_decay: float) -> list[dict]:
    params = dict(clip.named_parameters())
    decay, no_decay = ([params[name] for name in names] for names in param_group_names(clip))
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
