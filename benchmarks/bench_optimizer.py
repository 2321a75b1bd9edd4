"""The AdamW step, which ``optim.fused`` picks: torch's fused AdamW (fastclip's default on CUDA) and DeepSpeed's
FusedAdam (``optim.fused_adam``) against torch's foreach AdamW, the optimizer open_clip's training uses
(``torch.optim.AdamW`` with its defaults), on the same parameters in the same run.

The parameters are a real architecture's, laid out as the engine hands them to the optimizer: ZeRO-1/2 give it one
flat fp32 partition per parameter group (fastclip's two, decay and no decay; one rank holds them whole), ZeRO-0 one
fp32 tensor per parameter. Gradients are random; the step is timed alone (median after warm-up), which is what the
choice changes in a training step. GPU: ViT-B/32 (151M parameters). CPU: fastclip-tiny, both layouts.
"""

from __future__ import annotations

import pytest
import torch

from fastclip.config import ModelConfig

from harness import Result, time_fn


def _groups(arch: str) -> tuple[list[tuple[float, list[torch.Size]]], list[torch.Size]]:
    """([(weight decay, parameter shapes)] by fastclip's groups, all shapes) of ``arch``, built on the meta
    device."""
    import open_clip

    from fastclip.model import _quiet_random_init, param_group_names, resolve_model_name

    with torch.device("meta"), _quiet_random_init():
        clip = open_clip.create_model(resolve_model_name(arch), device="meta")
    shapes = dict((n, p.shape) for n, p in clip.named_parameters())
    groups = [(0.1 if kind == "decay" else 0.0, [shapes[n] for n in names]) for kind, names in param_group_names(clip)]
    return groups, list(shapes.values())


def _params(layout: str, arch: str, device: str) -> list[dict]:
    """Optimizer groups of fp32 leaves with random gradients: 'flat' (ZeRO-1/2) or 'per-tensor' (ZeRO-0)."""
    groups, _ = _groups(arch)
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for decay, shapes in groups:
        sizes = [s.numel() for s in shapes] if layout == "per-tensor" else [sum(s.numel() for s in shapes)]
        params = []
        for size in sizes:
            p = torch.nn.Parameter(torch.randn(size, generator=g).mul_(0.02).to(device))
            p.grad = torch.randn(size, generator=g).mul_(1e-3).to(device)
            params.append(p)
        out.append({"params": params, "weight_decay": decay})
    return out


def _step_time(kind: str, layout: str, arch: str, device: str, repeats: int) -> float | None:
    groups = _params(layout, arch, device)
    hyper = dict(lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    if kind == "deepspeed FusedAdam":
        from deepspeed.ops.adam import FusedAdam

        optimizer = FusedAdam(groups, adam_w_mode=True, **hyper)
    else:
        optimizer = torch.optim.AdamW(groups, fused=kind == "torch fused" or None, **hyper)
    return time_fn(optimizer.step, repeats=repeats, warmup=2, cuda=device == "cuda").median_s


def _record(record, arch: str, layout: str, device: str, repeats: int, kinds: list[str]) -> None:
    n_params = sum(s.numel() for s in _groups(arch)[1])
    params = {"model": arch, "layout": layout, "parameters": n_params, "device": device}
    foreach = _step_time("torch foreach", layout, arch, device, repeats)
    for kind in kinds:
        note = "baseline: torch.optim.AdamW's default (foreach), open_clip's optimizer"
        try:
            t = _step_time(kind, layout, arch, device, repeats)
        except Exception as e:  # DeepSpeed's FusedAdam is JIT-built with nvcc: a machine without it cannot
            t, note = None, f"{kind} unavailable: {type(e).__name__}: {str(e)[:160]}"
        record(Result("optimizer", f"AdamW step, {kind}", params, "seconds", t, foreach, note=note))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["flat", "per-tensor"])
def test_adamw_step_gpu(record, quick, layout):
    _record(record, "ViT-B-32", layout, "cuda", 5 if quick else 20, ["torch fused", "deepspeed FusedAdam"])


@pytest.mark.parametrize("layout", ["flat", "per-tensor"])
def test_adamw_step_cpu(record, quick, layout):
    arch = ModelConfig().name  # fastclip-tiny: 8.8M parameters
    _record(record, arch, layout, "cpu", 3 if quick else 10, ["torch fused"])
