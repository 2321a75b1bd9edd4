"""``train.precision``: what each setting means for DeepSpeed's config, the inputs' dtype and the autocast context.

- ``bf16``: DeepSpeed's bf16 mode: bf16 weights (views into ZeRO's flat buffers) and activations, fp32 masters in
  the optimizer.
- ``amp_bf16``: open_clip's default (``--precision amp_bf16``): fp32 weights, each op under torch autocast in bf16
  (fresh bf16 copies of the weights per forward, as open_clip's step makes them), through DeepSpeed's own
  ``torch_autocast`` mode, which wraps the engine's forward. Gradients are reduced in fp32 as open_clip's DDP does:
  ``lower_precision_safe_modules`` is empty, so DeepSpeed keeps no bf16 gradient copies for the reduce (its
  default would round the Linear and Conv gradients to bf16 before the reduce, even on one rank). What calls the
  module around DeepSpeed's forward (the compiled paths, eval) enters :func:`autocast` itself.
- ``fp32``: fp32 throughout (TF32 matmuls on CUDA unless ``train.tf32 false``).
- ``auto`` (the default): ``bf16`` where the device computes bf16 natively, ``fp32`` elsewhere: a GPU before
  Ampere (V100, T4), or a CPU without AVX-512 or AMX, where torch emulates bf16 matmuls (26x slower than fp32 on
  an AVX2 EPYC here: the demo's step went from about 1 s to 17 s).
"""

from __future__ import annotations

import contextlib

import torch


def resolve(precision: str, *, cuda: bool) -> str:
    """What ``train.precision`` means on this machine: 'auto' made 'bf16' or 'fp32'; the others as they are."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(cuda=cuda) else "fp32"


def native_bf16(*, cuda: bool) -> bool:
    """Whether this machine's device runs bf16 matmuls natively: compute capability 8.0 or later (Ampere) on CUDA,
    oneDNN's bf16 support on a CPU (AVX-512 or AMX; torch's own test for its bf16 kernels)."""
    if cuda:
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def deepspeed_sections(precision: str, *, check_overflow: bool) -> dict:
    """The DeepSpeed config sections of ``precision``: "bf16" always (its overflow check is fastclip's
    optim.skip_nonfinite), "torch_autocast" for amp_bf16; DeepSpeed refuses bf16 and torch_autocast together."""
    sections = {"bf16": {"enabled": precision == "bf16", "check_grad_overflow": check_overflow}}
    if precision == "amp_bf16":
        sections["torch_autocast"] = {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    return sections


def of_engine(engine) -> str:
    """'bf16', 'amp_bf16' or 'fp32', as the engine runs (read back, not from the run config)."""
    if engine.bfloat16_enabled():
        return "bf16"
    return "amp_bf16" if engine.torch_autocast_enabled() else "fp32"


def input_dtype(precision: str) -> torch.dtype:
    """The dtype images are fed in: bf16 under amp_bf16 too (its first op, the patch conv, autocasts them to bf16
    anyway; bf16 halves the held micro batches of contrastive accumulation)."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def autocast(precision: str, device: torch.device):
    """torch autocast to bf16 for amp_bf16 (what DeepSpeed's forward enters), nothing for the others."""
    if precision != "amp_bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def configure_matmuls(device: torch.device, *, tf32: bool) -> None:
    """Faster fp32 matmuls on a GPU (what stays fp32 under bf16: the loss's reductions, eval, fp32 runs), and
    cuDNN's autotuner for the patch-embedding conv, whose shapes never change. CPU numerics are left alone."""
    if device.type != "cuda" or not tf32:
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
