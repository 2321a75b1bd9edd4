"""Device-resident meters: the one place where device numbers become host numbers.

Each meter keeps a running sum and count as tensors on the step's device; updating one is an in-place add
that queues on the device and never waits. :meth:`Meters.collect` stacks every meter into one tensor,
all-reduces it once across ranks, copies it to the host once (the sync point) and resets.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class AverageMeter:
    """A named running average ``sum / count`` on the device, with a format for the log line."""

    def __init__(self, name: str, *, device: torch.device, fmt: str = ":.4f"):
        self.name, self.fmt = name, fmt
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, value: torch.Tensor | float, n: int = 1) -> None:
        """Add ``value`` (a mean over ``n`` items) without a host sync."""
        if isinstance(value, torch.Tensor):
            self.total.add_(value.detach().to(self.total.dtype) * n)
        else:
            self.total.add_(value * n)
        self.count.add_(n)

    def reset(self) -> None:
        self.total.zero_()
        self.count.zero_()

    def format(self, value: float) -> str:
        return ("{name} {value" + self.fmt + "}").format(name=self.name, value=value)


class Meters:
    """A group of meters collected together: one all-reduce and one host copy for all of them."""

    def __init__(self, names: list[str], *, device: torch.device, fmt: str = ":.4f"):
        self.meters = {name: AverageMeter(name, device=device, fmt=fmt) for name in names}

    def __getitem__(self, name: str) -> AverageMeter:
        return self.meters[name]

    def collect(self, *, reduce: bool = True) -> dict[str, float]:
        """Averages over all updates since the last collect (and over ranks), then reset. A host sync."""
        stacked = torch.stack([torch.stack([m.total, m.count]) for m in self.meters.values()])
        if reduce and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(stacked)
        values = stacked.tolist()  # note: the host sync of a logging step
        for m in self.meters.values():
            m.reset()
        return {name: (total / count if count else float("nan")) for name, (total, count) in zip(self.meters, values)}


def due(step: int, every: int) -> bool:
    """A cadence of ``every`` steps (0: never)."""
    return every > 0 and step % every == 0


@dataclass
class Interval:
    """The steps since the last log line: how many, since when, and the host time spent waiting for data."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    data_time: float = 0.0

    def add(self, data_time: float) -> None:
        self.steps, self.data_time = self.steps + 1, self.data_time + data_time

    def rates(self, global_batch: int, world_size: int) -> dict[str, float]:
        """Throughput and time per step over these steps, as logged: samples/s (all ranks and per GPU), host
        seconds waiting for data and wall seconds per step."""
        elapsed = time.perf_counter() - self.start
        per_second = self.steps * global_batch / elapsed
        return {"samples_per_second": per_second, "samples_per_second_per_gpu": per_second / world_size,
                "data_time": self.data_time / self.steps, "batch_time": elapsed / self.steps}  # fmt: skip
