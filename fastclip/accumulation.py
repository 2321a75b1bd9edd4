"""Contrastive accumulation: one optimizer step whose contrastive loss spans all K micro batches (GradCache).

Plain gradient accumulation (``train.accum_mode independent``) gives each micro batch its own loss, so a sample
meets only the negatives of its micro batch: n x ranks of them, not the K x n x ranks the step's batch holds.
Here a step keeps every negative, in three phases:

1. :meth:`ContrastiveAccumulation.cache`: each micro batch forwarded without a graph, its features kept
   (K x n x D per rank: a few MB) with the random state its forward started from;
2. the loss over all of them at once (the run's loss function: fused op, gathered across ranks exactly as a
   plain step gathers) and its gradient with respect to every feature and the logit scale;
3. :meth:`ContrastiveAccumulation.replay`: each micro batch forwarded again from the same random state (dropout,
   patch dropout draw the same masks), returning a surrogate whose gradient is that micro batch's slice of the
   feature gradients; the trainer back-propagates it with ``engine.backward`` and calls ``engine.step``, so
   DeepSpeed's accumulation boundary, gradient reduction, clipping and the sync-free step are unchanged.

The parameter gradients are then those of one step on the whole batch, dL/dθ = Σ_k (dL/df_k)ᵀ df_k/dθ, with
activation memory of one micro batch. The price is the second forward: 4/3 of a plain step's compute (forward 1,
backward 2, forward again 1). The micro batches' inputs are held for the replay, in the training dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from fastclip.data.batch import Batch
from fastclip.model import logit_scale_of

ACCUM_MODES = {
    "contrastive": "one loss over all micro batches of a step: every sample meets every negative of the step",
    "independent": "DeepSpeed's plain accumulation: each micro batch its own loss, negatives of that micro batch",
}


@dataclass(frozen=True)
class RandomState:
    """The generators a forward may draw from (dropout, patch dropout): the CPU's, and the device's on CUDA. Both
    are host-side state (a seed and an offset on CUDA), so capturing and restoring them never waits for the
    device."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


@dataclass
class FeatureCache:
    """What phase 1 and 2 leave for the replay: the loss (fp32, detached), the logit scale, the gradients of the
    loss with respect to each micro batch's features (rows in micro-batch order) and the logit scale, and the
    random state each micro batch's forward started from."""

    loss: torch.Tensor
    scale: torch.Tensor
    image_grads: list[torch.Tensor]
    text_grads: list[torch.Tensor]
    scale_grad: torch.Tensor
    random_states: list[RandomState]
    after: RandomState  # where the generators stood after phase 1; restored once the replay is done


class ContrastiveAccumulation:
    """The feature cache and replay of a contrastive accumulation step (see the module doc).

    ``forward`` is the trainer's (a batch to the model's output dict, through the DeepSpeed engine);
    ``loss_fn`` the run's contrastive loss, called once per step on the K micro batches' features together.
    """

    def __init__(self, forward: Callable[[Batch], dict[str, torch.Tensor]], loss_fn, device: torch.device):
        self.forward, self.loss_fn, self.device = forward, loss_fn, device

    def cache(self, micro: list[Batch]) -> FeatureCache:
        states, images, texts = [], [], []
        with torch.no_grad():
            for batch in micro:
                states.append(RandomState.capture(self.device))
                out = self.forward(batch)
                images.append(out["image_features"])
                texts.append(out["text_features"])
        after = RandomState.capture(self.device)
        scale = logit_scale_of(out)  # the same parameters for every micro batch of the step
        image_all = torch.cat(images).requires_grad_()
        text_all = torch.cat(texts).requires_grad_()
        scale_leaf = scale.detach().requires_grad_()
        with torch.enable_grad():
            loss = self.loss_fn(image_all, text_all, scale_leaf)
            image_grad, text_grad, scale_grad = torch.autograd.grad(loss, (image_all, text_all, scale_leaf))
        sizes = [len(b.images) for b in micro]
        return FeatureCache(
            loss=loss.detach(),
            scale=scale,
            image_grads=list(image_grad.split(sizes)),
            text_grads=list(text_grad.split(sizes)),
            scale_grad=scale_grad,
            random_states=states,
            after=after,
        )

    def replay(self, cache: FeatureCache, k: int, batch: Batch) -> torch.Tensor:
        """Micro batch ``k`` forwarded again from its cached random state; a scalar whose gradient with respect
        to the model is that micro batch's share of dL/dθ. Its value means nothing: back-propagate it without
        dividing by the accumulation steps (the loss is already the whole batch's mean)."""
        cache.random_states[k].restore()
        out = self.forward(batch)
        surrogate = _dot(out["image_features"], cache.image_grads[k]) + _dot(out["text_features"], cache.text_grads[k])
        if k == 0:  # the logit scale's gradient, once: every micro batch's forward gives the same scale
            surrogate = surrogate + logit_scale_of(out) * cache.scale_grad
        if k == len(cache.random_states) - 1:
            cache.after.restore()  # the generators continue as after one forward of each micro batch
        return surrogate


def _dot(features: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """sum(features * grad) in fp32: its gradient with respect to ``features`` is ``grad`` (in their dtype)."""
    return (features.float() * grad.float()).sum()


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA allocation failure, or the CPU allocator's."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
    )
