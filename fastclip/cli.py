"""The command line: ``[--config FILE] [--section.field VALUE ...] [--deepspeed_config FILE]`` and ``--help``.

A YAML file first, then the overrides in order; values are read as YAML (``--optim.betas [0.9, 0.95]``), except
that a value YAML would read as a mapping or list without brackets stays the string typed.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from fastclip.config import Config
from fastclip.config_tree import build_config, unknown
from fastclip.errors import ConfigError


class HelpRequested(Exception):
    """--help: the caller prints :func:`usage` and exits 0."""


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


def _sections() -> set[str]:
    """The names of Config's nested sections (those with fields), as opposed to its plain values."""
    hints = typing.get_type_hints(Config)
    return {name for name, tp in hints.items() if dataclasses.is_dataclass(tp)}


def _apply(tree: dict[str, Any], section: str, key: str, value: Any) -> None:
    body = tree.setdefault(section, {})
    if not isinstance(body, dict):
        raise ConfigError(f"{section}: takes a single value, not fields; got a value for {section}.{key}")
    body[key] = value


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


def split_options(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """(the --config file, [(key, value)] of every other option, in order, values as typed; the launcher's
    --local_rank and --deepspeed left out)."""
    config_file, options = None, []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            raise HelpRequested
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: options look like --section.field VALUE")
        key, eq, value = arg[2:].partition("=")
        i += 1
        if key == "deepspeed":  # the launcher's flag, with no value
            continue
        if not eq:
            # a single dash is a value (--optim.eps -1); two start the next option, so this one has no value
            if i >= len(argv) or argv[i].startswith("--"):
                got = f" (got the option {argv[i]} instead)" if i < len(argv) else ""
                raise ConfigError(f"--{key} needs a value{got}")
            value, i = argv[i], i + 1
        if key in ("local_rank", "local-rank"):
            continue  # the launcher's; LOCAL_RANK in the environment says the same
        if key == "config":
            if config_file is not None:
                raise ConfigError(f"--config given twice ({config_file}, {value}): merge them into one file")
            config_file = value
        else:
            options.append((key, value))
    return config_file, options


def load_yaml(config_file: str) -> dict[str, Any]:
    """A --config file as a tree of sections; an empty section (``optim:``) means its defaults."""
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"--config: no such file {config_file!r}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {config_file}: not valid YAML: {e}") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {config_file}: expected a mapping of sections, got {type(loaded).__name__}")
    sections, tree = _sections(), {}
    for section, body in loaded.items():
        if section in sections and body is None:
            body = {}
        if section in sections and not isinstance(body, dict):
            raise ConfigError(
                f"--config {config_file}: section {section!r} must hold fields (or nothing), got {body!r}"
            )
        tree[section] = dict(body) if isinstance(body, dict) else body
    return tree


def parse_args(argv: list[str]) -> Config:
    """The run config from the command line (see the module doc). ``--local_rank`` / ``--local-rank`` (added by
    the deepspeed launcher) and ``--deepspeed`` are accepted and ignored."""
    config_file, options = split_options(argv)
    tree = load_yaml(config_file) if config_file is not None else {}
    for key, value in options:
        apply_option(tree, key, value)
    return build_config(tree)


def apply_option(tree: dict[str, Any], key: str, value: str) -> None:
    """``--key value`` as typed, over a config tree (what :func:`fastclip.config_tree.build_config` reads)."""
    if key in ("deepspeed_config", "deepspeed-config"):
        tree["deepspeed_config"] = value
        return
    section, dot, name = key.partition(".")
    if not dot:
        raise unknown("option", f"--{key}", ["--config", "--deepspeed_config", "--section.field"])
    _apply(tree, section, name, _parse_value(value))
