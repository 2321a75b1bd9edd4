"""``--train.benchmark N --train.benchmark_try "train.zero_stage=1,2 train.compile=none,step"``: several settings of
the run's own config (fastclip/benchmark_try.py) measured in one invocation, as fastclip/benchmark.py measures one.

Each setting's Trainer is built once, before the first round, and kept for every round: a build costs a model, an
engine and (``train.compile``) a compilation, more than a round's steps. The price is memory: every setting's
weights, optimizer state and loader stay resident while the others step. On a GPU the peak reported is still the
setting's own (the others' resident memory subtracted); an out-of-memory says to try fewer settings at once.

The rounds alternate: each measures every setting once (warm-up, then N steps data excluded, then the same from the
loader), every other round in reverse order, so the machine's drift (clocks, heat, a neighbour's load) hits every
setting alike. A setting's figures are its medians over rounds, with the spread of its rate between rounds. Every
rank runs the settings in the same order (the steps are collective). Rank 0 prints one table, marks the fastest
(data included samples/s/GPU) and prints the command that trains with it; ``log.dir/benchmark.json`` has it all,
each setting's config ``log.dir/sweep/NN/config.json``.

One thing DeepSpeed keeps process-wide: once an amp_bf16 setting is built (its ``TORCH_AUTOCAST_INITIALIZED``), a
later setting's gradient reduce follows per-parameter communication dtypes. That changes nothing unless a
``--deepspeed_config`` file sets ``communication_data_type``; with one that does, compare those settings in two runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastclip.benchmark import batches, card, fresh_stream, measure, publish, versions
from fastclip.benchmark_try import Setting, command_line, settings
from fastclip.config import Config
from fastclip.data.batch import Batch
from fastclip.errors import OutOfMemory
from fastclip.out_of_memory import is_out_of_memory
from fastclip.trainer import Trainer
from fastclip.world import World

ROUNDS = 3  # an odd count: the median is one round's figure; each round measures every setting once
PHASES = ("data excluded", "data included")


@dataclass
class _Tried:
    """One setting's trainer, its batches, and its measurements so far."""

    setting: Setting
    trainer: Trainer
    fixed: list[Batch]
    resident: int  # bytes it holds between steps on CUDA (weights, optimizer state, batches); 0 on a CPU
    rounds: list[dict] = field(default_factory=list)  # per round: {phase: fastclip.benchmark.measure's figures}


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # the allocator's count: no sync


def _own_log(cfg: Config, index: int) -> Config:
    """A setting's config logging into a folder of its own (its config.json beside the sweep's benchmark.json), with
    no wandb or TensorBoard run: one process would open one per setting, and a benchmark logs no metrics there."""
    log = dataclasses.replace(cfg.log, dir=str(Path(cfg.log.dir) / "sweep" / f"{index:02d}"), wandb=False,
                              tensorboard=False)  # fmt: skip
    return dataclasses.replace(cfg, log=log)


def _build(setting: Setting, index: int, world: World) -> _Tried:
    before = _allocated(world.device)
    trainer = Trainer(_own_log(setting.cfg, index), world)
    try:
        fixed = batches(trainer)
        # one step now: the optimizer's state (and a compiled step's graph) comes with the first, and belongs to
        # what this setting holds between steps
        trainer.train_step(iter(fixed))
    except BaseException:
        trainer.close()
        raise
    return _Tried(setting, trainer, fixed, _allocated(world.device) - before)


def _measure_round(tried: _Tried, *, others: int) -> None:
    """Both phases of one round; ``others``: the bytes the other settings' trainers hold meanwhile."""
    cfg, trainer = tried.setting.cfg.train, tried.trainer
    phases = {"data excluded": measure(trainer, itertools.cycle(tried.fixed), cfg.benchmark, cfg.benchmark_warmup)}
    with fresh_stream(trainer) as stream:  # opened per round: an idle setting's stream would decode ahead
        phases["data included"] = measure(trainer, stream, cfg.benchmark, cfg.benchmark_warmup)
    for m in phases.values():
        if m["peak_memory_gb"] is not None:
            m["peak_memory_gb"] -= others / 1e9  # the device's peak holds the other trainers too: not this setting's
    tried.rounds.append(phases)


@contextlib.contextmanager
def _memory_said(resident: int):
    """An out-of-memory in the sweep says that the other settings' trainers stay resident, and what to do."""
    try:
        yield
    except Exception as e:
        if not (isinstance(e, OutOfMemory) or is_out_of_memory(e)):
            raise
        raise OutOfMemory(
            f"{' '.join(str(e).split())[:400]} [in the benchmark sweep, beside {resident / 1e9:.1f} GB that the "
            "other settings' trainers hold (each is kept for every round rather than built again): try fewer "
            "settings at once in train.benchmark_try]"
        ) from e


def _measured(tried_settings: list[Setting], world: World) -> list[_Tried]:
    """Every setting built, then measured in alternating rounds; their trainers closed."""
    tried: list[_Tried] = []
    try:
        for index, setting in enumerate(tried_settings):
            with _memory_said(sum(t.resident for t in tried)):
                tried.append(_build(setting, index, world))
        total = sum(t.resident for t in tried)
        for r in range(ROUNDS):
            # every other round reversed: a drift over the round then favours neither the first nor the last
            for t in tried if r % 2 == 0 else tried[::-1]:
                with _memory_said(total - t.resident):
                    _measure_round(t, others=total - t.resident)
        return tried
    finally:
        for t in tried:
            t.trainer.close()


def _over_rounds(rounds: list[dict]) -> dict:
    """One phase's figures over the rounds: each its median (the peak memory its maximum), the rate's spread."""
    merged = {}
    for key in rounds[0]:
        values = [m[key] for m in rounds]
        merged[key] = None if values[0] is None else (max if key == "peak_memory_gb" else statistics.median)(values)
    rates = [m["samples_per_second_per_gpu"] for m in rounds]
    merged["rounds_samples_per_second_per_gpu"] = rates
    merged["rounds_spread"] = (max(rates) - min(rates)) / merged["samples_per_second_per_gpu"]
    return merged


def _row(t: _Tried) -> dict:
    trainer = t.trainer
    return {
        "setting": t.setting.label, "overrides": dict(t.setting.overrides), "global_batch": trainer.global_batch,
        "precision": trainer.precision, "zero_stage": trainer.stage, "compile": t.setting.cfg.train.compile,
        "flops_per_sample": trainer.flops_per_sample, "peak_flops": trainer.peak_flops,
        "resident_gb": t.resident / 1e9 if trainer.world.device.type == "cuda" else None,
        "phases": {phase: _over_rounds([r[phase] for r in t.rounds]) for phase in PHASES},
    }  # fmt: skip


def table(report: dict) -> str:
    rows, width = report["settings"], max(len("setting"), *(len(s["setting"]) for s in report["settings"]))
    lines = [
        f"benchmark sweep: {report['model']}, {report['card']}, {report['world']}; {report['steps']} steps after "
        f"{report['warmup']} warm-up a phase, {report['rounds']} rounds alternating; medians over rounds",
        f"  {'setting':{width}}{'batch':>7}{'samples/s/GPU: excl.':>22}{'incl.':>9}{'± rounds':>10}{'MFU':>8}"
        f"{'peak mem':>10}{'step p50':>11}",
    ]
    for s in rows:
        excluded, included = (s["phases"][phase] for phase in PHASES)
        mfu = f"{100 * included['mfu']:.1f}%" if included["mfu"] is not None else "—"
        peaks = [p["peak_memory_gb"] for p in (excluded, included) if p["peak_memory_gb"] is not None]
        mem = f"{max(peaks):.1f} GB" if peaks else "—"
        mark = "*" if s["setting"] == report["fastest"] else " "
        lines.append(
            f"{mark} {s['setting']:{width}}{s['global_batch']:>7}{excluded['samples_per_second_per_gpu']:>22,.1f}"
            f"{included['samples_per_second_per_gpu']:>9,.1f}{100 * included['rounds_spread']:>9.1f}%{mfu:>8}"
            f"{mem:>10}{1e3 * included['step_time_median_s']:>8.1f} ms"
        )
    lines.append(
        "* the fastest, data included (MFU, ± rounds and step p50 are data included too; peak mem: the setting's "
        f"own). To train with it:\n  {report['command']}"
    )
    return "\n".join(lines)


def run(cfg: Config, world: World, *, argv: list[str]) -> dict:
    """Every setting of ``train.benchmark_try`` measured on every rank; rank 0 reports. Returns the report.
    ``argv``: the script's own arguments, from which the fastest setting's command is made."""
    measured = _measured(settings(cfg), world)
    rows = [_row(t) for t in measured]
    fastest = max(rows, key=lambda s: s["phases"]["data included"]["samples_per_second_per_gpu"])
    nodes = len({m["node"] for m in world.members}) or 1
    command = command_line(argv, measured[rows.index(fastest)].setting, nodes=nodes, per_node=world.local_world_size)
    report = {
        "model": cfg.model.name, "card": card(world.device), "device": world.device.type, "world": world.layout(),
        "world_size": world.world_size, "steps": cfg.train.benchmark, "warmup": cfg.train.benchmark_warmup,
        "rounds": ROUNDS, "tried": cfg.train.benchmark_try, "versions": versions(), "settings": rows,
        "fastest": fastest["setting"], "command": command,
    }  # fmt: skip
    if world.is_main:
        publish(report, table(report), cfg.log.dir)
    return report
