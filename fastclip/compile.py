"""``train.compile``: torch.compile of the training step, where DeepSpeed allows it.

- ``model``: the CLIP towers' forward (and, through AOTAutograd, their backward) compiled as one module.
- ``step``: forward, logit scale and the contrastive loss as one compiled function (the fused loss op is traced,
  it is registered with torch.library), so the graph spans towers and loss and its backward is compiled with it.
  With contrastive accumulation the towers and the loss over the cached features are compiled apart (the step's
  micro batches are forwarded, cached and replayed between them).

Both compile the module's ``forward`` itself, not ``engine(...)`` nor the module's call: DeepSpeed's forward
pre/post hooks (timers, the flops profiler, ZeRO-3's parameter discovery; no work at ZeRO-1/2 in fastclip's
config) read the engine's step counter, which a compiled graph would guard on and recompile for at every step.
Gradients still reach DeepSpeed's parameter hooks and ``engine.backward``. ZeRO-0 and 3 are refused: ZeRO-3
gathers parameters in those forward hooks, and ZeRO-0 (the unfused bf16 optimizer) syncs every step anyway. The
optimizer step (DeepSpeed's) is not compiled. Evaluation runs the eager module (other batch sizes, no gradients:
compiling them would recompile for nothing). Compile once: batch shapes are fixed (training drops the last
partial batch), so no step after the first recompiles (tests/test_compile.py holds it with dynamo's
error_on_recompile).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def compile_fn(fn: Callable, *, backend: str, fullgraph: bool = False) -> Callable:
    return torch.compile(fn, backend=backend, fullgraph=fullgraph, dynamic=False)


def compile_parts(
    mode: str, backend: str, *, forward: Callable, loss_fn: Callable, step_fn: Callable, contrastive: bool
) -> tuple[Callable | None, Callable | None, Callable]:
    """(compiled towers or None, compiled forward + loss or None, the loss function) for ``train.compile``.
    ``forward`` is the module's forward, not its call (see above); with contrastive accumulation in ``step`` mode
    the loss over the cached features is compiled apart, so the loss function comes back compiled."""
    if mode == "none":
        return None, None, loss_fn
    towers = compile_fn(forward, backend=backend) if mode == "model" or contrastive else None
    if mode == "step" and contrastive:
        loss_fn = compile_fn(loss_fn, backend=backend)
    step = compile_fn(step_fn, backend=backend) if mode == "step" and not contrastive else None
    return towers, step, loss_fn
