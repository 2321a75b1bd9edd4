"""Evaluation metrics as open_clip_train computes them."""

import pytest
import torch


def test_retrieval_recalls_equal_open_clips_metrics():
    """R@1, R@5, R@10 both ways as open_clip_train's get_clip_metrics gives them, in row chunks smaller than the set."""
    from open_clip_train.train import get_clip_metrics

    from fastclip.eval import _recall_at

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(images + 1.2 * torch.randn(300, 32, generator=g), dim=-1)
    theirs = get_clip_metrics(images, texts, 1.0)
    for name, (queries, keys) in (("image_to_text", (images, texts)), ("text_to_image", (texts, images))):
        ours = _recall_at(queries, keys, chunk=64)
        assert 0 < ours[1] < ours[5] < ours[10] < 1
        for k, recall in ours.items():
            assert recall == pytest.approx(float(theirs[f"{name}_R@{k}"]), abs=1e-12), (name, k)
