"""Find the host syncs of a training step, on any device.

A host sync is a point where Python waits for the device: a tensor value read on the host (``.item()``,
``bool(t)``, ``float(t)``, ``if t:``), an op whose output size depends on tensor values (``nonzero``,
``masked_select``), or an explicit device synchronize. On a GPU each one stalls the launch queue, so the
device idles while Python catches up. ``torch.cuda.set_sync_debug_mode`` only sees them on CUDA;
:class:`HostSyncAudit` sees them on a CPU too (the CPU tensors stand in for device tensors), which is how the
test suite holds the "no host syncs in a non-logging step" line without a GPU.

    with HostSyncAudit(host_tensors=optimizer_step_counters(engine.optimizer)) as audit:
        trainer.train_step(batches)
    assert not audit.syncs, audit.report()
"""

from __future__ import annotations

import gc
import traceback
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that copy a tensor value to the host, or whose output shape needs one
_VALUE_READS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), bool(), float(), int(), if t:
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}
# a fill whose value is a tensor: CUDA's kernel reads the value on the host (.item()) before it launches
_TENSOR_FILLS = {torch.ops.aten.masked_fill_.Tensor, torch.ops.aten.masked_fill.Tensor}
# a device-to-host copy waits for the device (a blocking one always); on a CPU run these are invisible
_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}
_LIBRARY_DIRS = ("/torch/", "/torch\\")  # frames skipped when naming where a sync came from


@dataclass(frozen=True)
class Sync:
    kind: str  # the op, or 'synchronize'
    where: str  # the innermost frames outside torch: 'file:line in function' joined by ' <- '


def _where(stack: list[traceback.FrameSummary]) -> str:
    here = str(Path(__file__))
    frames = [f for f in stack if f.filename != here and not any(d in f.filename for d in _LIBRARY_DIRS)]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(frames[-3:]))


def _device_to_host(func, args, kwargs) -> bool:
    if func is torch.ops.aten._to_copy.default:
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    dst, src = args[0], args[1]
    non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    return dst.device.type == "cpu" and src.device.type != "cpu" and not non_blocking


class HostSyncAudit(TorchDispatchMode):
    """Counts host syncs inside the ``with`` block.

    On a ``device`` other than the CPU, reads of CPU tensors are not syncs and are not counted. On the CPU,
    ``host_tensors`` names the tensors that live on the host by design (a torch optimizer's ``step`` counters
    unless it is capturable or fused), so that only stand-ins for device tensors count; device-to-host copies
    (``.cpu()``, ``.tolist()``) are seen on a GPU only. Explicit synchronizes are counted through
    ``torch.cuda.synchronize`` and DeepSpeed's accelerator.
    """

    def __init__(self, *, device: torch.device | str = "cpu", host_tensors: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._on_cpu = torch.device(device).type == "cpu"
        self._host_ids = {id(t) for t in host_tensors}
        self.syncs: Counter[Sync] = Counter()
        self._restore: list[tuple[object, str, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _VALUE_READS and not self._on_host(args[0] if args else None):
            self._record(func.name())
        elif func in _TENSOR_FILLS and not self._on_host(args[2]):
            self._record(func.name())
        elif not self._on_cpu and func in _COPIES and _device_to_host(func, args, kwargs or {}):
            self._record(func.name())
        return func(*args, **(kwargs or {}))

    def _on_host(self, t) -> bool:
        if not isinstance(t, torch.Tensor):
            return False
        return id(t) in self._host_ids if self._on_cpu else t.device.type == "cpu"

    def _record(self, kind: str) -> None:
        self.syncs[Sync(kind, _where(traceback.extract_stack()[:-2]))] += 1

    def _wrap_synchronize(self, owner: object, name: str) -> None:
        original = getattr(owner, name)
        audit = self

        def counted(*args, **kwargs):
            audit._record("synchronize")
            return original(*args, **kwargs)

        self._restore.append((owner, name, original))
        setattr(owner, name, counted)

    def __enter__(self):
        # Garbage from before the block is not the audited code's: a DeepSpeed engine left in a reference cycle
        # synchronizes in its ``__del__``, whenever the collector happens to run (CI saw two such syncs).
        gc.collect()
        self._wrap_synchronize(torch.cuda, "synchronize")
        try:
            from deepspeed.accelerator import get_accelerator

            self._wrap_synchronize(type(get_accelerator()), "synchronize")
        except ImportError:
            pass
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for owner, name, original in reversed(self._restore):
                setattr(owner, name, original)
            self._restore.clear()

    @property
    def total(self) -> int:
        return sum(self.syncs.values())

    def report(self) -> str:
        if not self.syncs:
            return "no host syncs"
        lines = [f"{self.total} host sync(s):"]
        lines += [f"  {n} x {s.kind} at {s.where}" for s, n in self.syncs.most_common()]
        return "\n".join(lines)


def optimizer_step_counters(optimizer) -> list[torch.Tensor]:
    """The ``step`` tensors of a torch optimizer, found through DeepSpeed's wrappers (``.optimizer``)."""
    found, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        state = getattr(optimizer, "state", None)
        if isinstance(state, dict):
            for entry in state.values():
                step = entry.get("step") if isinstance(entry, dict) else None
                if isinstance(step, torch.Tensor):
                    found.append(step)
        optimizer = getattr(optimizer, "optimizer", None)
    return found
