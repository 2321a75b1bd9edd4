"""Caption tokenizer: the model's own open_clip tokenizer, so token ids match open_clip exactly."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastclip.model import resolve_model_name


def build_tokenizer(model_name: str) -> Callable[[list[str]], torch.Tensor]:
    """``texts -> LongTensor[len(texts), context_length]`` for the architecture ``model_name`` (name or JSON)."""
    import open_clip

    return open_clip.get_tokenizer(resolve_model_name(model_name))
