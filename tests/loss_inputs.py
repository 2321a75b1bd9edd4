"""Inputs for the loss tests: unit-norm image and text features with correlated pairs, a logit scale (and a SigLIP
bias), drawn from one seeded generator in that order so each test's numbers are the same in every run."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def features(
    n: int, d: int, seed: int, *, noise: float = 0.7, scale: tuple[float, float] = (10.0, 20.0),
    bias: tuple[float, float] | None = None,
) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """(images, texts, scale[, bias]) in float64: texts are the images plus ``noise`` of fresh noise, normalized;
    the scale (and the bias, when its range is given) uniform in its range."""
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    b = F.normalize(a + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    lo, hi = scale
    s = torch.tensor(lo + (hi - lo) * torch.rand((), generator=g).item(), dtype=torch.float64)
    if bias is None:
        return a, b, s
    lo, hi = bias
    return a, b, s, torch.tensor(lo + (hi - lo) * torch.rand((), generator=g).item(), dtype=torch.float64)
