"""Run configuration: nested dataclasses, a YAML file, ``--section.field value`` overrides.

Every field is documented in one line beside it. Structural checks run in ``__post_init__`` (cheap, no
I/O); :func:`check_inputs` touches the filesystem (shards exist and open) and runs in every rank before
any model is built. :func:`deepspeed_config` derives the DeepSpeed JSON from the run config, or checks a
user-given one against it.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from fastclip.schedules import SCHEDULES

DEMO_DIR = os.environ.get("FASTCLIP_DEMO_DIR", ".cache/fastclip-demo")


class ConfigError(ValueError):
    """A configuration or input problem the user must fix; the message names the field and the fix."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass
class ModelConfig:
    name: str = "fastclip-tiny"  # open_clip architecture (see open_clip.list_models()) or a model-config JSON path
    pretrained: str | None = None  # local checkpoint file to start from (state_dict or {'state_dict': ...})
    force_image_size: int | None = None  # override the architecture's input resolution

    def __post_init__(self):
        _require(bool(self.name), "model.name", "must name an open_clip architecture or a model-config JSON file")
        _require(
            self.force_image_size is None or self.force_image_size > 0,
            "model.force_image_size",
            f"must be a positive number of pixels, got {self.force_image_size}",
        )


@dataclass
class DataConfig:
    train_shards: str | None = None  # webdataset tars: a glob, a brace range ({000..099}) or '::'-joined list
    val_shards: str | None = None  # same syntax; empty disables evaluation
    batch_size: int = 64  # samples per GPU (rank) per micro step
    zeroshot_classnames: str | None = None  # JSON list of class names; index = the sample's .cls
    zeroshot_templates: str | None = None  # JSON list of prompt templates with one '{}'
    demo_dir: str = DEMO_DIR  # with no train_shards, the synthetic demo world is generated (once) here
    num_threads: int = 2  # DALI CPU threads per rank (torch loader: DataLoader workers)
    shuffle_buffer: int = 1024  # samples in the shuffle buffer (per rank; per worker with the torch loader)
    loader: str = "auto"  # 'dali', 'torch' (DataLoader + torchvision) or 'auto' (DALI when it is installed)
    decode_device: str = "auto"  # 'auto' (GPU decode when CUDA exists), 'mixed' (nvJPEG) or 'cpu'
    crop_scale: tuple[float, float] = (0.9, 1.0)  # random-resized-crop area range, as open_clip's default
    max_bad_fraction: float = 0.01  # damaged shards (truncated, unreadable) skipped up to this fraction, else stop

    def __post_init__(self):
        _require(self.batch_size > 0, "data.batch_size", f"must be a positive integer, got {self.batch_size}")
        _require(self.num_threads > 0, "data.num_threads", f"must be positive, got {self.num_threads}")
        _require(self.shuffle_buffer > 0, "data.shuffle_buffer", f"must be positive, got {self.shuffle_buffer}")
        _require(
            self.loader in ("auto", "dali", "torch"), "data.loader", f"must be auto, dali or torch, got {self.loader!r}"
        )
        _require(
            self.decode_device in ("auto", "mixed", "cpu"),
            "data.decode_device",
            f"must be 'auto', 'mixed' or 'cpu', got {self.decode_device!r}",
        )
        bad = self.max_bad_fraction
        _require(0 <= bad < 1, "data.max_bad_fraction", f"must be in [0, 1) (0 stops on any damaged shard), got {bad}")
        lo, hi = self.crop_scale
        _require(
            0 < lo <= hi <= 1, "data.crop_scale", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}"
        )

    @property
    def demo(self) -> bool:
        """True when no shards were given: train on the generated synthetic world."""
        return not self.train_shards


@dataclass
class LossConfig:
    local_loss: bool = True  # each rank computes its rows against all columns (open_clip's --local-loss)
    gather_with_grad: bool = True  # all-gather features with gradient (open_clip's --gather-with-grad)
    backend: str = "auto"  # 'auto' (fused: C++ on CPU, Triton on CUDA), 'cpp', 'triton', 'torch', 'open_clip'

    def __post_init__(self):
        choices = ("auto", "cpp", "triton", "torch", "open_clip")
        _require(self.backend in choices, "loss.backend", f"must be one of {', '.join(choices)}; got {self.backend!r}")


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate after warmup
    weight_decay: float = 0.1  # AdamW decay; never applied to biases, norms, embeddings or the logit scale
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (open_clip's ViT defaults)
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 50  # linear warmup to lr, in optimizer steps
    schedule: str = "cosine"  # after warmup: 'cosine', 'cosine_restarts' (SGDR) or 'constant'
    min_lr_ratio: float = 0.0  # cosine (and each restart cycle) decays to lr * min_lr_ratio
    restart_steps: int = 0  # cosine_restarts: steps in the first cycle; 0 means a quarter of the post-warmup steps
    restart_mult: float = 1.0  # cosine_restarts: each cycle this many times longer than the one before
    restart_decay: float = 1.0  # cosine_restarts: each cycle's peak lr this many times the one before
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    fused_adam: bool = False  # on CUDA, DeepSpeed's FusedAdam (JIT-compiled with nvcc) instead of torch's AdamW
    skip_nonfinite: bool = False  # skip steps whose grads hold inf/NaN (DeepSpeed's check: a host sync per step)
    max_skipped_steps: int = 10  # with skip_nonfinite: this many skipped steps in a row end the run (exit 1)

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, "optim.eps", f"must be positive (AdamW divides by sqrt(v) + eps), got {self.eps}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        choices = ", ".join(SCHEDULES)
        _require(self.schedule in SCHEDULES, "optim.schedule", f"must be one of {choices}, got {self.schedule!r}")
        _require(self.restart_steps >= 0, "optim.restart_steps", f"must be >= 0, got {self.restart_steps}")
        _require(self.restart_mult >= 1, "optim.restart_mult", f"must be >= 1, got {self.restart_mult}")
        _require(0 < self.restart_decay <= 1, "optim.restart_decay", f"must be in (0, 1], got {self.restart_decay}")
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        skips = self.max_skipped_steps
        _require(skips > 0, "optim.max_skipped_steps", f"must be a positive number of steps, got {skips}")


@dataclass
class TrainConfig:
    steps: int = 0  # optimizer steps to run; 0 means train.epochs passes over the train shards
    epochs: int = 3  # passes over the train shards, used when train.steps is 0
    grad_accum: int = 1  # micro batches per optimizer step
    zero_stage: int = 2  # DeepSpeed ZeRO stage, 0 to 3 (1 and 2 step without host syncs; 0 and 3 sync)
    precision: str = "bf16"  # 'bf16' or 'fp32'
    tf32: bool = True  # on CUDA: TF32 tensor cores for fp32 matmuls and convs, cuDNN autotuning
    seed: int = 0  # seeds model init and data order (offset by rank for the data)

    def __post_init__(self):
        _require(self.steps >= 0, "train.steps", f"must be >= 0 (0 means use train.epochs), got {self.steps}")
        _require(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        _require(self.grad_accum > 0, "train.grad_accum", f"must be positive, got {self.grad_accum}")
        _require(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _require(
            self.precision in ("bf16", "fp32"), "train.precision", f"must be 'bf16' or 'fp32', got {self.precision!r}"
        )


@dataclass
class LogConfig:
    dir: str = "runs/demo"  # metrics.jsonl (appended), the resolved config, TensorBoard events
    every: int = 10  # optimizer steps between log lines; the only steps that copy numbers to the host
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = False  # also write TensorBoard scalars to log.dir/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb` and a login)
    wandb_project: str = "fastclip"  # W&B project name

    def __post_init__(self):
        _require(self.every > 0, "log.every", f"must be a positive number of steps, got {self.every}")


@dataclass
class CheckpointConfig:
    dir: str = "runs/demo/checkpoints"  # DeepSpeed checkpoints (one folder per step) and open_clip.pt
    every: int = 0  # optimizer steps between checkpoints; 0 saves only at the end
    resume: str | None = None  # 'latest' or a checkpoint folder to resume the engine from
    export_open_clip: bool = True  # at the end, write open_clip.pt that open_clip.create_model(pretrained=) loads
    keep: int = 0  # newest step folders to keep, older ones deleted after each save; 0 keeps all

    def __post_init__(self):
        _require(self.every >= 0, "checkpoint.every", f"must be >= 0 (0 saves at the end only), got {self.every}")
        _require(self.keep >= 0, "checkpoint.keep", f"must be >= 0 (0 keeps every checkpoint), got {self.keep}")


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between evaluations; 0 evaluates only at the end
    early_stop_patience: int = 0  # stop when val clip loss has not improved for this many evaluations; 0 never
    early_stop_min_delta: float = 0.0  # an improvement must lower the val clip loss by more than this
    zeroshot: bool = True  # zero-shot top-1 when class names and templates are known
    batch_size: int = 0  # eval batch per rank; 0 uses data.batch_size

    def __post_init__(self):
        _require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        patience, delta = self.early_stop_patience, self.early_stop_min_delta
        _require(patience >= 0, "eval.early_stop_patience", f"must be >= 0 (0 never stops early), got {patience}")
        _require(
            patience == 0 or self.every > 0,
            "eval.early_stop_patience",
            "needs evaluations during training: set eval.every too",
        )
        _require(delta >= 0, "eval.early_stop_min_delta", f"must be >= 0, got {delta}")
        _require(
            self.batch_size >= 0, "eval.batch_size", f"must be >= 0 (0 uses data.batch_size), got {self.batch_size}"
        )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed_config: str | None = None  # a DeepSpeed JSON that replaces the derived one (batch sizes must agree)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a YAML value into the field's declared type, or say which field wants what."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                pass
        raise ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{name}: expected a list of {len(args)} values like [0.9, 1.0], got {value!r}")
        return tuple(_coerce(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        # inf and nan pass every `x > 0` style check below them and poison the run much later
        if not math.isfinite(number):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    return value


def _unknown(kind: str, name: str, choices: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, choices, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(choices))}")


def _sections() -> set[str]:
    """The names of Config's nested sections (those with fields), as opposed to its plain values."""
    hints = typing.get_type_hints(Config)
    return {name for name, tp in hints.items() if dataclasses.is_dataclass(tp)}


def _apply(tree: dict[str, Any], section: str, key: str, value: Any) -> None:
    body = tree.setdefault(section, {})
    if not isinstance(body, dict):
        raise ConfigError(f"{section}: takes a single value, not fields; got a value for {section}.{key}")
    body[key] = value


def build_config(tree: dict[str, Any]) -> Config:
    """Build a validated Config from a nested dict ({'data': {'batch_size': 64}, ...})."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for section, body in tree.items():
        if section not in sections:
            raise _unknown("config section", section, list(sections))
        tp = hints[section]
        if not dataclasses.is_dataclass(tp):
            kwargs[section] = _coerce(body, tp, section)
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping of fields, got {body!r}")
        field_types = typing.get_type_hints(tp)
        values = {}
        for key, value in body.items():
            if key not in field_types:
                raise _unknown("config field", f"{section}.{key}", [f"{section}.{k}" for k in field_types])
            values[key] = _coerce(value, field_types[key], f"{section}.{key}")
        kwargs[section] = tp(**values)
    return Config(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:  # 'a: b: c', '@x': not YAML, so the plain string (a str field takes it; others say)
        return text
    if value is None and text not in ("null", "~", "None", "none"):
        return text
    if isinstance(value, (dict, list)) and not text.lstrip().startswith(("[", "{")):
        return text  # 'shards/*.tar::' is YAML for a mapping: only brackets ask for a list or a mapping
    return value


class HelpRequested(Exception):
    """--help: the caller prints :func:`usage` and exits 0."""


def _field_docs(tp) -> dict[str, str]:
    """name -> the one-line comment beside the field in this file (the documentation users read)."""
    import inspect

    docs = {}
    for line in inspect.getsource(tp).splitlines():
        head, _, comment = line.partition("  # ")
        name = head.strip().split(":", 1)[0]
        if comment and name.isidentifier() and ":" in head:
            docs[name] = comment.strip()
    return docs


def usage() -> str:
    """Every section and field with its type, default and one-line doc."""
    lines = [
        "usage: deepspeed [--num_gpus K] fastclip/train.py [--config FILE.yaml] [--section.field VALUE ...]",
        "       [--deepspeed_config FILE.json]      (also: python -m fastclip.train, torchrun -m fastclip.train)",
        "",
        "With no arguments: the demo (a tiny CLIP model on the generated synthetic world).",
    ]
    defaults = Config()
    for section in dataclasses.fields(Config):
        tp = typing.get_type_hints(Config)[section.name]
        if not dataclasses.is_dataclass(tp):
            continue
        lines += ["", f"{section.name}:"]
        docs = _field_docs(tp)
        for f in dataclasses.fields(tp):
            value = getattr(getattr(defaults, section.name), f.name)
            lines.append(f"  --{section.name}.{f.name} (default {value!r})  {docs.get(f.name, '')}".rstrip())
    return "\n".join(lines)


def parse_args(argv: list[str]) -> Config:
    """``[--config FILE] [--section.field VALUE | --section.field=VALUE ...] [--deepspeed_config FILE]``.

    ``--local_rank`` / ``--local-rank`` (added by the deepspeed launcher) and ``--deepspeed`` are accepted.
    """
    tree: dict[str, Any] = {}
    overrides: list[tuple[str, str]] = []
    config_file = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise HelpRequested
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.field VALUE")
        key, eq, value = arg[2:].partition("=")
        if key in ("deepspeed",):  # a flag with no value
            i += 1
            continue
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key} needs a value")
            value = argv[i + 1]
            # a single dash is a value (--optim.eps -1); two start the next option, so this one has no value
            if value.startswith("--"):
                raise ConfigError(f"--{key} needs a value (got the option {value} instead)")
            i += 1
        i += 1
        if key in ("local_rank", "local-rank"):
            continue  # the launcher's; LOCAL_RANK in the environment says the same
        if key == "config":
            if config_file is not None:
                raise ConfigError(f"--config given twice ({config_file}, {value}): merge them into one file")
            config_file = value
        elif key in ("deepspeed_config", "deepspeed-config"):
            tree["deepspeed_config"] = value
        else:
            overrides.append((key, value))
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config: no such file {config_file!r}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {config_file}: not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {config_file}: expected a mapping of sections, got {type(loaded).__name__}")
        sections = _sections()
        for section, body in loaded.items():
            if section in sections and body is None:
                body = {}  # `optim:` with nothing under it: all defaults
            if section in sections and not isinstance(body, dict):
                raise ConfigError(
                    f"--config {config_file}: section {section!r} must hold fields (or nothing), got {body!r}"
                )
            if isinstance(body, dict):
                tree.setdefault(section, {})
                for k, v in body.items():
                    _apply(tree, section, k, v)
            else:
                tree[section] = body
    for key, value in overrides:
        section, dot, name = key.partition(".")
        if not dot:
            raise _unknown("option", f"--{key}", ["--config", "--deepspeed_config", "--section.field"])
        _apply(tree, section, name, _parse_value(value))
    return build_config(tree)


# ------------------------------------------------------------------------------ inputs and derived values


def _check_checkpoint_file(path: str) -> None:
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


def check_inputs(cfg: Config) -> None:
    """Filesystem checks, run by every rank before any model is built: shards exist and open, files parse."""
    from fastclip.data.loader import dali_available
    from fastclip.data.shards import resolve_shards

    # the torch loader walks every tar header to count samples: walk them here, before any model (it reuses it)
    walk = cfg.data.loader == "torch" or (cfg.data.loader == "auto" and not dali_available())
    for name in ("train_shards", "val_shards"):
        if spec := getattr(cfg.data, name):
            resolve_shards(spec, field=f"data.{name}", max_bad_fraction=cfg.data.max_bad_fraction, count=walk)
    for name in ("zeroshot_classnames", "zeroshot_templates"):
        path = getattr(cfg.data, name)
        if path is None:
            continue
        try:
            items = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"data.{name}: cannot read a JSON list from {path!r}: {e}") from e
        if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
            raise ConfigError(f"data.{name}: {path!r} must hold a non-empty JSON list of strings")
    if cfg.model.pretrained is not None:
        _check_checkpoint_file(cfg.model.pretrained)
    if cfg.eval.early_stop_patience and not (cfg.data.val_shards or cfg.data.demo):
        raise ConfigError("eval.early_stop_patience: needs a validation set; set data.val_shards")
    if cfg.deepspeed_config is not None and not Path(cfg.deepspeed_config).is_file():
        raise ConfigError(f"--deepspeed_config: no such file {cfg.deepspeed_config!r}")


def use_demo_world(cfg: Config) -> Config:
    """With no train shards, point the data config at the synthetic demo world (generating it if needed)."""
    if not cfg.data.demo:
        return cfg
    from fastclip.data.synthetic import generate

    root = generate(cfg.data.demo_dir)
    data = dataclasses.replace(
        cfg.data,
        train_shards=str(root / "train" / "*.tar"),
        val_shards=cfg.data.val_shards or str(root / "val" / "*.tar"),
        zeroshot_classnames=cfg.data.zeroshot_classnames or str(root / "classnames.json"),
        zeroshot_templates=cfg.data.zeroshot_templates or str(root / "templates.json"),
    )
    return dataclasses.replace(cfg, data=data)


def deepspeed_config(cfg: Config, *, world_size: int, cuda: bool) -> dict[str, Any]:
    """The DeepSpeed config for this run, derived from ``cfg`` or read from ``cfg.deepspeed_config``."""
    micro, accum = cfg.data.batch_size, cfg.train.grad_accum
    derived: dict[str, Any] = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "steps_per_print": 10**9,  # fastclip logs on its own cadence, without extra host syncs
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and step (fastclip/zero.py)
        "timers": {"throughput": {"enabled": False}},
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": cfg.optim.skip_nonfinite},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                # torch's foreach AdamW unless asked for DeepSpeed's FusedAdam (a CUDA op JIT-built at start-up)
                "torch_adam": not (cuda and cfg.optim.fused_adam),
            },
        },
    }
    if cfg.deepspeed_config is None:
        return derived
    path = cfg.deepspeed_config
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--deepspeed_config: cannot read JSON from {path!r}: {e}") from e
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if key in given and given[key] != derived[key]:
            raise ConfigError(
                f"--deepspeed_config {path}: {key}={given[key]} disagrees with the run config, which gives "
                f"{derived[key]} (data.batch_size={micro}, train.grad_accum={accum}, world size {world_size}). "
                "Change one so they agree, or drop the key from the JSON."
            )
        given.setdefault(key, derived[key])
    return given


def total_steps(cfg: Config, *, samples_per_epoch: int, world_size: int) -> tuple[int, int]:
    """(optimizer steps to run, optimizer steps per epoch) for ``samples_per_epoch`` training samples."""
    global_batch = cfg.data.batch_size * cfg.train.grad_accum * world_size
    per_epoch = samples_per_epoch // global_batch
    if per_epoch == 0:
        raise ConfigError(
            f"data.train_shards hold {samples_per_epoch} samples, fewer than one global batch of {global_batch} "
            f"(data.batch_size={cfg.data.batch_size} x train.grad_accum={cfg.train.grad_accum} x {world_size} ranks). "
            "Lower data.batch_size or add shards."
        )
    steps = cfg.train.steps or cfg.train.epochs * per_epoch
    return steps, per_epoch


__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "HelpRequested",
    "DataConfig",
    "EvalConfig",
    "LogConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "build_config",
    "check_inputs",
    "deepspeed_config",
    "parse_args",
    "total_steps",
    "usage",
    "use_demo_world",
]
