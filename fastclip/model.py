"""open_clip models by architecture name or model-config JSON, and AdamW parameter groups for them."""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fastclip.config import DECAY_RULES, LossConfig, ModelConfig
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


def config_to_register(name: str) -> Path | None:
    """The model-config JSON open_clip must be given (``open_clip.add_model_config``) before it knows ``name``: the
    JSON itself, or the one fastclip ships; None for open_clip's own architectures."""
    if name.endswith(".json"):
        return Path(name).resolve()
    shipped = _BUILTIN_CONFIGS / f"{name}.json"
    return shipped if shipped.is_file() else None


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


# What decays (optim.decay_rule). open_clip_train's rule: 1-d tensors and names with bn, ln, bias or logit_scale
# are exempt, so its 2-d embeddings decay; 'no_embeddings' (fastclip's rule before 2026-12) also exempts those.
_EXEMPT = {
    "open_clip": ("bn", "ln", "bias", "logit_scale"),
    "no_embeddings": ("bn", "ln", "bias", "logit_scale", "embedding"),
}
# DeepSpeed's ZeRO-1/2 make each parameter a view into its group's flat buffer, padded at the group's end only: a
# tensor whose size is not a multiple of 8 elements (16 bytes of bf16, 32 of fp32) shifts every one after it off
# the 16-byte boundary that cuBLASLt's bias epilogues and the vectorized LayerNorm kernels want (issue 28).
ALIGN_ELEMENTS = 8


def _shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3's partitioned parameters hold their shape aside


def _decays(name: str, param: torch.nn.Parameter, rule: str) -> bool:
    return not (len(_shape(param)) < 2 or any(key in name for key in _EXEMPT[rule]))


def param_group_names(
    clip: torch.nn.Module, *, rule: str = "open_clip", align: bool = True
) -> list[tuple[str, list[str]]]:
    """The optimizer's two parameter groups as (kind, names), kind 'decay' or 'no_decay', in the order the optimizer
    holds them (which names its tensors: checkpoints record this layout).

    ``align``: each group's tensors of a multiple of :data:`ALIGN_ELEMENTS` elements first, in model order, so each
    starts 16-byte aligned in DeepSpeed's flat buffer, then the others (the 1-element logit scale, aligned too, and
    SigLIP's logit bias, 2 bytes after it: a scalar the loss reads once, where alignment buys nothing). Groups of
    their own would align that one as well, but DeepSpeed's universal-checkpoint load indexes the step of each
    group's first parameter in a rank's partition, and a 1-element group's partition on ranks >= 1 is all padding:
    every resume across world sizes onto 2 or more ranks would fail. Without ``align``, model order (the layout
    before 2026-12, whose no-decay buffer starts with the logit scale)."""
    trainable = [(name, p) for name, p in clip.named_parameters() if p.requires_grad]
    sizes = {name: math.prod(_shape(p)) for name, p in trainable}
    groups = []
    for kind, decays in (("decay", True), ("no_decay", False)):
        names = [name for name, p in trainable if _decays(name, p, rule) == decays]
        if align:
            names = sorted(names, key=lambda n: sizes[n] % ALIGN_ELEMENTS != 0)  # stable: model order within each
        groups.append((kind, names))
    return groups


def param_groups(
    clip: torch.nn.Module, *, weight_decay: float, rule: str = "open_clip", align: bool = True
) -> list[dict]:
    """AdamW's parameter groups (:func:`param_group_names`), each named by its kind: engine.apply_adamw_settings
    gives the 'decay' ones ``weight_decay`` and the others none."""
    params = dict(clip.named_parameters())
    return [
        {"params": [params[n] for n in names], "weight_decay": weight_decay if kind == "decay" else 0.0, "name": kind}
        for kind, names in param_group_names(clip, rule=rule, align=align)
    ]


def saved_layout(meta: dict | None, clip: torch.nn.Module) -> list[tuple[str, list[str]]]:
    """The parameter groups a checkpoint's optimizer holds: its fastclip.json record, or for folders saved before
    the record existed, the layout of that time (exempt embeddings, no alignment) computed on ``clip``."""
    if meta is not None and "param_groups" in meta:
        return [(kind, list(names)) for kind, names in meta["param_groups"]]
    return param_group_names(clip, rule="no_embeddings", align=False)


def regroup_flags(saved: list[tuple[str, list[str]]], clip: torch.nn.Module, meta: dict) -> str | None:
    """None when ``saved`` (a checkpoint's groups) is this run's layout (``meta``'s record); else the flags that
    build it, for a message (or a description, when no setting does)."""
    if [list(names) for _, names in saved] == [list(names) for _, names in meta["param_groups"]]:
        return None
    for rule, align in itertools.product(DECAY_RULES, (True, False)):
        if [list(n) for _, n in param_group_names(clip, rule=rule, align=align)] == [list(n) for _, n in saved]:
            return f"--optim.decay_rule {rule} --train.align_params {str(align).lower()}"
    return f"the parameter groups it was saved with ({', '.join(f'{k} x{len(n)}' for k, n in saved)})"


def architecture_has_bias(model_name: str) -> bool:
    """Whether open_clip builds ``model_name`` with a logit bias (its SigLIP architectures: init_logit_bias)."""
    import open_clip

    cfg = open_clip.get_model_config(resolve_model_name(model_name)) or {}
    return cfg.get("init_logit_bias") is not None


def loss_kind(loss: LossConfig, model_name: str) -> str:
    """'clip' or 'siglip': loss.kind, with 'auto' following the architecture (a logit bias means SigLIP)."""
    has_bias = architecture_has_bias(model_name)
    if loss.kind == "auto":
        return "siglip" if has_bias else "clip"
    if loss.kind == "clip" and has_bias:
        raise ConfigError(
            f"loss.kind clip: model.name {model_name!r} is a SigLIP architecture (it has a logit bias, which the "
            "softmax loss does not train); use loss.kind siglip (or auto), or a CLIP architecture"
        )
    return loss.kind
