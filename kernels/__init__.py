"""Triton kernels, installed as ``fastclip.kernels``. The fused contrastive loss lands here (issue 3)."""
