"""The DeepSpeed engine: its config, derived from the run config with a ``--deepspeed_config`` file merged over it,
and the engine built from it. The engine is then the one source of truth for its settings (ZeRO stage,
precision): the trainer reads them back from it.

A user file is a set of overrides: ``{"zero_optimization": {"reduce_bucket_size": 200000000}}`` changes that one
key and keeps fastclip's others (the sync-free settings of fastclip/zero.py among them); an optimizer of
another type than AdamW replaces fastclip's whole. A key that the run config also sets (batch sizes,
accumulation, ZeRO stage, precision, the overflow check, clipping, AdamW's hyperparameters) must agree with it,
or it is an error naming both values: the trainer, the non-finite guard and a resume read the run config.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

from fastclip.config import Config, OptimConfig
from fastclip.console import say
from fastclip.errors import ConfigError
from fastclip.precision import deepspeed_sections, resolve


def derived_config(cfg: Config, *, world_size: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config the run config asks for."""
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    return {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "steps_per_print": 10**9,  # fastclip logs on its own cadence, without extra host syncs
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and step (fastclip/zero.py)
        "timers": {"throughput": {"enabled": False}},
        "gradient_clipping": cfg.optim.grad_clip,
        # memory_efficient_linear (ZeRO-3) would replace torch.nn.functional.linear for the whole process, for good
        # ("This will persist unless manually reset"): every model built after it in the process (open_clip's in a
        # benchmark, another setting of a sweep) would run its Linears through DeepSpeed's autograd Function. torch's
        # own linear keeps the same tensors for the backward: ZeRO-3 releases and re-gathers the weight it saved.
        "zero_optimization": {"stage": cfg.train.zero_stage, "memory_efficient_linear": False},
        **deepspeed_sections(resolve(cfg.train.precision, cuda=cuda), check_overflow=cfg.optim.skip_nonfinite),
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                # torch's AdamW unless asked for DeepSpeed's FusedAdam (a CUDA op JIT-built at start-up)
                "torch_adam": not (cuda and cfg.optim.fused_adam),
                **_torch_adamw_kind(cfg.optim, cuda),
            },
        },
    }


def _torch_adamw_kind(optim, cuda: bool) -> dict:
    """torch's AdamW as one fused kernel per step (``fused``, the default; DeepSpeed passes the key through to it)
    or as foreach ops. Fused reads and writes the fp32 masters and both moments once a step instead of once an op:
    on the CPU 0.14x of foreach's step time on ZeRO's flat partitions, 0.30x per tensor (benchmarks/
    bench_optimizer.py; the GPU case is in benchmarks/gpu_suite.sh)."""
    if cuda and optim.fused_adam:
        return {}  # DeepSpeed's FusedAdam
    return {"fused": True} if optim.fused else {}


ADAM = ("adam", "adamw")
# JSON objects in DeepSpeed's config
SECTIONS = ("zero_optimization", "bf16", "fp16", "optimizer", "scheduler", "timers", "torch_autocast")


def _merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_user(derived: dict, given: dict) -> dict:
    """``given`` over ``derived``, key by key; an optimizer of another type replaces fastclip's AdamW whole (its
    params would not fit)."""
    merged = _merged(derived, {k: v for k, v in given.items() if k != "optimizer"})
    if "optimizer" in given:
        kind = str(given["optimizer"].get("type", "AdamW")).lower()
        merged["optimizer"] = _merged(derived["optimizer"], given["optimizer"]) if kind in ADAM else given["optimizer"]
    return merged


def _read(path: str) -> dict[str, Any]:
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--deepspeed_config: cannot read JSON from {path!r}: {e}") from e
    if not isinstance(given, dict):
        raise ConfigError(f"--deepspeed_config {path}: expected a JSON object, got {type(given).__name__}")
    if "bfloat16" in given:  # DeepSpeed's older name of the section, which "bf16" (fastclip's) would shadow
        given["bf16"] = _merged(given.pop("bfloat16") or {}, given.get("bf16") or {})
    for key in SECTIONS:
        if key in given and not isinstance(given[key], dict):
            raise ConfigError(f"--deepspeed_config {path}: {key} must be a JSON object, got {given[key]!r}")
    return given


def _contradictions(given: dict, derived: dict, cfg: Config, world_size: int) -> list[str]:
    """What a user file sets differently from what the run config derives, in the keys the trainer relies on."""
    says = {
        "train_batch_size": f"data.batch_size x train.grad_accum x {world_size} ranks",
        "train_micro_batch_size_per_gpu": "data.batch_size",
        "gradient_accumulation_steps": "train.grad_accum",
    }
    found = [
        f"{key}={given[key]} where the run config gives {derived[key]} ({source})"
        for key, source in says.items()
        if key in given and given[key] != derived[key]
    ]
    if hint := _accumulation_hint(given, cfg, world_size):
        found.append(hint)
    precision = "train.precision" + (" auto (on this device)" if cfg.train.precision == "auto" else "")
    found += _differ(given, derived, {
        "zero_optimization.stage": "train.zero_stage",
        "bf16.enabled": precision,
        "torch_autocast.enabled": precision,
        "bf16.check_grad_overflow": "optim.skip_nonfinite",
        "gradient_clipping": "optim.grad_clip",
    })  # fmt: skip
    if str(given.get("optimizer", {}).get("type", "AdamW")).lower() in ADAM:  # another type replaces it whole
        found += _differ(given, derived, {f"optimizer.params.{k}": f"optim.{k}" for k in ADAMW_PARAMS})
    if given.get("fp16", {}).get("enabled"):
        found.append("fp16.enabled=true: fastclip trains in bf16 or fp32 (train.precision)")
    return found


ADAMW_PARAMS = ("lr", "betas", "eps", "weight_decay")


def _accumulation_hint(given: dict, cfg: Config, world_size: int) -> str | None:
    """The train.grad_accum that would give a file's train_batch_size with data.batch_size, or why none does."""
    wanted, per_step = given.get("train_batch_size"), cfg.data.batch_size * world_size
    if not isinstance(wanted, int) or wanted <= 0 or wanted == per_step * cfg.train.grad_accum:
        return None
    if wanted % per_step == 0:
        return f"--train.grad_accum {wanted // per_step} would give train_batch_size={wanted} on {world_size} ranks"
    return (
        f"no train.grad_accum gives train_batch_size={wanted} with data.batch_size {cfg.data.batch_size}: it is "
        f"not a multiple of {cfg.data.batch_size} x {world_size} ranks"
    )


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def _differ(given: dict, derived: dict, fields: dict[str, str]) -> list[str]:
    """'key=X where run.field gives Y' for each DeepSpeed key that ``given`` sets otherwise than ``derived``; the
    run config is the one place those settings are made (the trainer, the guard and a resume read it)."""
    out = []
    for key, field in fields.items():
        mine, theirs = _lookup(given, key), _lookup(derived, key)
        if mine is not None and mine != theirs:
            out.append(f"{key}={json.dumps(mine)} where {field} gives {json.dumps(theirs)}")
    return out


def deepspeed_config(cfg: Config, *, world_size: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config for this run: derived from ``cfg``, with ``cfg.deepspeed_config``'s keys over it."""
    derived = derived_config(cfg, world_size=world_size, cuda=cuda)
    if cfg.deepspeed_config is None:
        return derived
    path = cfg.deepspeed_config
    given = _read(path)
    if found := _contradictions(given, derived, cfg, world_size):
        raise ConfigError(
            f"--deepspeed_config {path} disagrees with the run config: {'; '.join(found)}. Set the run config "
            "(--section.field) instead, or drop the key from the file."
        )
    return _merge_user(derived, given)


def build_engine(clip, *, cfg: Config, world_size: int, cuda: bool, params: list[dict], lr_scheduler):
    """``deepspeed.initialize`` on the merged config, with fastclip's sync-free clipping; returns (engine,
    scheduler, config). ``lr_scheduler`` (a callable of the optimizer) gives way to a "scheduler" in a user file,
    which DeepSpeed would otherwise ignore in favour of it."""
    import deepspeed

    from fastclip.zero import sync_free_clipping

    ds_config = deepspeed_config(cfg, world_size=world_size, cuda=cuda)
    engine, _, _, scheduler = deepspeed.initialize(
        model=clip,
        model_parameters=params,
        config=ds_config,
        lr_scheduler=None if "scheduler" in ds_config else lr_scheduler,
    )
    sync_free_clipping(engine.optimizer)
    if cfg.deepspeed_config:
        say(f"deepspeed: {cfg.deepspeed_config} merged over the derived config: {ds_config}")
    return engine, scheduler, ds_config


def full_params(engine, stage: int):
    """Under ZeRO-3 the module's parameters are partitioned: gathered for whole-model work (evaluation)."""
    if stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


def release(engine) -> None:
    """ZeRO's gradient hooks live on autograd nodes, which Python's collector cannot see through: without their
    removal the engine, its parameters and optimizer state outlive the trainer (a second trainer in the same
    process, a sweep or a benchmark's batch probe, would run beside a dead one's memory)."""
    try:
        engine.destroy()  # it synchronizes the device
    except Exception as e:  # a device that already failed (a sticky CUDA error): the error to see came first
        say(f"fastclip: the DeepSpeed engine was not released cleanly ({type(e).__name__}: {e})")


def apply_adamw_settings(groups: list[dict], optim: OptimConfig) -> None:
    """This run's betas, eps and weight decay on the optimizer's groups (a checkpoint's state restores its own)."""
    for group in groups:
        group["betas"], group["eps"] = tuple(optim.betas), optim.eps
        group["weight_decay"] = optim.weight_decay if group.get("name") == "decay" else 0.0  # see param_groups
