"""``--train.benchmark_try "train.zero_stage=1,2 train.precision=bf16,fp32"``: the settings a benchmark sweep tries.

Each space-separated item is ``section.field=v1,v2,...`` (a value in brackets may hold commas:
``optim.betas=[0.9,0.98],[0.9,0.95]``). The settings are every combination of one value per item, each applied
over the run's own config as the command line applies ``--section.field VALUE`` (fastclip/cli.py), so the model,
batch, world, data and DeepSpeed file stay the run's. Every combination is built, and so validated, here: before
any model. The sweep itself (rounds, table) is fastclip/benchmark_sweep.py's.
"""

from __future__ import annotations

import itertools
import shlex
from dataclasses import dataclass

from fastclip.cli import apply_option, parse_args, split_options
from fastclip.config import Config
from fastclip.config_tree import build_config
from fastclip.errors import ConfigError

# what one process cannot compare between settings (by key prefix), and why
_NOT_TRIED = {
    "train.benchmark": "it is the sweep's own setting",
    "dist.": "the world is joined once per invocation",
    "train.tf32": "matmul precision is process-wide, so one setting's would hold for all: compare it in two runs",
}


@dataclass(frozen=True)
class Setting:
    overrides: tuple[tuple[str, str], ...]  # (key, value as typed), in the try string's order
    cfg: Config  # the run's config with them applied

    @property
    def label(self) -> str:
        return " ".join(f"{key}={value}" for key, value in self.overrides)


def _values(text: str) -> list[str]:
    """``1,2`` -> ['1', '2']; a comma inside brackets belongs to its value (``[0.9,0.98],[0.9,0.95]``)."""
    values, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "[{") - (char in "]}")
        if char == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    return [*values, text[start:]]


def items(text: str) -> list[tuple[str, list[str]]]:
    """The try string's items as (key, [values as typed]); a :class:`ConfigError` naming the item that is wrong."""
    parsed: list[tuple[str, list[str]]] = []
    for item in text.split():
        key, eq, rest = item.partition("=")
        values = _values(rest)
        where = f"train.benchmark_try: item {item!r}"
        if not (eq and key and all(values)):
            raise ConfigError(f"{where}: write it as section.field=value,value,... (e.g. train.zero_stage=1,2)")
        if why := next((why for prefix, why in _NOT_TRIED.items() if key.startswith(prefix)), None):
            raise ConfigError(f"{where}: {key} cannot be tried ({why}); drop the item")
        if key in (k for k, _ in parsed):
            raise ConfigError(f"{where}: {key} is tried twice; give all its values in one item ({key}=a,b)")
        if len(set(values)) < len(values):
            raise ConfigError(f"{where}: a value is repeated; give each once")
        parsed.append((key, values))
    if not parsed:
        raise ConfigError('train.benchmark_try: no settings given; e.g. "train.zero_stage=1,2 train.compile=none,step"')
    return parsed


def settings(cfg: Config) -> list[Setting]:
    """Every combination of ``train.benchmark_try`` over ``cfg``, each validated as its own config ([] without a
    try string). Raises :class:`ConfigError` naming the combination the config refuses, and why."""
    text = cfg.train.benchmark_try
    if text is None:
        return []
    if not cfg.train.benchmark:
        raise ConfigError("train.benchmark_try: needs --train.benchmark N, the steps to measure of each setting")
    tried = items(text)
    keys = [key for key, _ in tried]
    return [_setting(cfg, tuple(zip(keys, combo))) for combo in itertools.product(*(v for _, v in tried))]


def _setting(cfg: Config, overrides: tuple[tuple[str, str], ...]) -> Setting:
    tree = cfg.to_dict()
    try:
        for key, value in overrides:
            apply_option(tree, key, value)
        return Setting(overrides, build_config(tree))
    except ConfigError as e:
        label = " ".join(f"{key}={value}" for key, value in overrides)
        raise ConfigError(
            f"train.benchmark_try: the setting '{label}' is refused: {str(e).rstrip('.')}. Change or drop that value "
            "in the try string"
        ) from e


def command_line(argv: list[str], setting: Setting, *, nodes: int, per_node: int) -> str:
    """The training run of ``setting``: the run's own arguments (``argv``, the script's as its ranks got them)
    without the benchmark options, with the setting's values in place of any the run gave for the same fields."""
    config_file, options = split_options(argv)
    tried = {_canonical(key) for key, _ in setting.overrides}
    kept = [(k, v) for k, v in options if not k.startswith("train.benchmark") and _canonical(k) not in tried]
    args = ["--config", config_file] if config_file else []
    args += [arg for key, value in [*kept, *setting.overrides] for arg in (f"--{key}", value)]
    again = parse_args(args)  # a --config file may set the benchmark too: then the command turns it off
    if again.train.benchmark:
        args += ["--train.benchmark", "0"]
    if again.train.benchmark_try is not None:
        args += ["--train.benchmark_try", "null"]
    # several nodes: DeepSpeed's launcher needs the hostfile the run was started with, which no rank knows
    launcher = f"deepspeed {f'--hostfile HOSTFILE --num_nodes {nodes} ' if nodes > 1 else ''}--num_gpus {per_node}"
    return f"{launcher} fastclip/train.py {shlex.join(args)}"


def _canonical(key: str) -> str:
    return "deepspeed_config" if key == "deepspeed-config" else key
