"""Contrastive accumulation: one optimizer step whose contrastive loss spans all K micro batches (GradCache).

Plain gradient accumulation (``train.accum_mode independent``) gives each micro batch its own loss, so a sample
meets only the negatives of its micro batch: n x ranks of them, not the K x n x ranks the step's batch holds.
Here a step keeps every negative, in three phases:

1. :meth:`ContrastiveAccumulation.cache`: each micro batch forwarded without a graph (but the last), its features
   kept (K x n x D per rank: a few MB) with the random state its forward started from;
2. the loss over all of them at once (the run's loss function: fused op, gathered across ranks exactly as a
   plain step gathers) and its gradient with respect to every feature and the logit scale;
3. :meth:`ContrastiveAccumulation.backward_passes`: each micro batch forwarded again from the same random state
   (dropout, patch dropout draw the same masks), giving a surrogate whose gradient is that micro batch's slice of
   the feature gradients; the trainer back-propagates it with ``engine.backward`` and calls ``engine.step``, so
   DeepSpeed's accumulation boundary, gradient reduction, clipping and the sync-free step are unchanged.

The parameter gradients are then those of one step on the whole batch, dL/dθ = Σ_k (dL/df_k)ᵀ df_k/dθ, with
activation memory of one micro batch. The price is the second forward of K - 1 micro batches (the last keeps its
graph): (4K - 1) / 3K of a plain step's compute (forward 1, backward 2, forward again 1), 1.25x at K=4. The micro
batches' inputs are held for the replay, in the training dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from fastclip.data.batch import Batch
from fastclip.model import loss_scalars


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
    """What phases 1 and 2 leave for phase 3: the loss (fp32, detached) and its scalar inputs (logit scale, and bias
    for SigLIP), the gradients of the loss with respect to each micro batch's features (rows in micro-batch order)
    and the scalars, the random state each micro batch's forward started from, the running statistics of batch
    norms after phase 1, and the last micro batch's output with its graph (when it is kept)."""

    loss: torch.Tensor
    scalars: dict[str, torch.Tensor]
    image_grads: list[torch.Tensor]
    text_grads: list[torch.Tensor]
    scalar_grads: dict[str, torch.Tensor]
    random_states: list[RandomState]
    after: RandomState  # where the generators stood after phase 1; restored once the replays are done
    norm_stats: list[torch.Tensor]
    last: dict[str, torch.Tensor] | None


def _norm_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    """The running statistics of the model's batch norms (open_clip's ResNet towers, timm towers with BN)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    return [buf for m in norms for buf in m.buffers()]  # running_mean, running_var, num_batches_tracked


class ContrastiveAccumulation:
    """The feature cache and replay of a contrastive accumulation step (see the module doc).

    ``forward`` is the trainer's (a batch to the model's output dict, through the DeepSpeed engine); ``loss_fn``
    the run's contrastive loss, called once per step on the K micro batches' features together; ``model`` the
    module, whose batch-norm statistics each micro batch updates once (a replay's update is undone).

    With ``keep_last_graph`` (a fused loss, which holds only O(N D) while phase 2 runs) the last micro batch is
    forwarded with its graph in phase 1 and back-propagated first in phase 3, without a replay: K - 1 second
    forwards instead of K, at no extra peak memory. A loss that builds the N x N logits (``loss.backend torch``
    or ``open_clip``) would hold them on top of that graph: every micro batch is replayed then.
    """

    def __init__(self, forward: Callable[[Batch], dict[str, torch.Tensor]], loss_fn, *, device: torch.device,
                 model: torch.nn.Module, keep_last_graph: bool):  # fmt: skip
        self.forward, self.loss_fn, self.device, self.keep_last_graph = forward, loss_fn, device, keep_last_graph
        self.norm_buffers = _norm_buffers(model)

    def cache(self, micro: list[Batch]) -> FeatureCache:
        states, images, texts = [], [], []
        for k, batch in enumerate(micro):
            states.append(RandomState.capture(self.device))
            with torch.set_grad_enabled(self.keep_last_graph and k == len(micro) - 1):
                out = self.forward(batch)
            images.append(out["image_features"].detach())
            texts.append(out["text_features"].detach())
        after = RandomState.capture(self.device)
        scalars = {k: v.detach() for k, v in loss_scalars(out).items()}  # the same for every micro batch of the step
        keys = ("image_features", "text_features", "logit_scale", "logit_bias")  # not, say, CoCa's logits
        last = {key: out[key] for key in keys if out.get(key) is not None}
        del out
        image_all = torch.cat(images).requires_grad_()
        text_all = torch.cat(texts).requires_grad_()
        leaves = [v.clone().requires_grad_() for v in scalars.values()]
        loss = self.loss_fn(image_all, text_all, *leaves)
        image_grad, text_grad, *scalar_grads = torch.autograd.grad(loss, (image_all, text_all, *leaves))
        sizes = [len(b.images) for b in micro]
        return FeatureCache(
            loss=loss.detach(),
            scalars=scalars,
            image_grads=list(image_grad.split(sizes)),
            text_grads=list(text_grad.split(sizes)),
            scalar_grads=dict(zip(scalars, scalar_grads)),
            random_states=states,
            after=after,
            norm_stats=[buf.clone() for buf in self.norm_buffers],
            last=last if self.keep_last_graph else None,
        )

    def backward_passes(self, cache: FeatureCache, micro: list[Batch]) -> Iterator[torch.Tensor]:
        """One scalar per micro batch whose gradient with respect to the model is that micro batch's share of
        dL/dθ: the last micro batch's from its kept graph (if kept), then each other one forwarded again from its
        cached random state, one at a time (back-propagate each before asking for the next). Their values mean
        nothing: back-propagate them without dividing by the accumulation steps (the loss is already the batch's
        mean). The gradients of the logit scale (and bias) ride on the first."""
        replays, kept = list(range(len(micro))), cache.last is not None
        if kept:
            out, cache.last = cache.last, None
            yield self._surrogate(cache, replays.pop(), out, with_scale=True)
            del out  # its graph was freed by the backward; the features need not outlive it
        for i, k in enumerate(replays):
            cache.random_states[k].restore()
            yield self._surrogate(cache, k, self.forward(micro[k]), with_scale=not kept and i == 0)
        cache.after.restore()  # the generators continue as after one forward of each micro batch
        for buf, saved in zip(self.norm_buffers, cache.norm_stats):
            buf.copy_(saved)  # each micro batch counted once in the running statistics, as in phase 1

    @staticmethod
    def _surrogate(cache: FeatureCache, k: int, out: dict[str, torch.Tensor], *, with_scale: bool) -> torch.Tensor:
        surrogate = _dot(out["image_features"], cache.image_grads[k]) + _dot(out["text_features"], cache.text_grads[k])
        if with_scale:  # every micro batch's forward gives the same scalars: their gradients once
            for name, value in loss_scalars(out).items():
                surrogate = surrogate + value * cache.scalar_grads[name]
        return surrogate


def _dot(features: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """sum(features * grad) in fp32: its gradient with respect to ``features`` is ``grad`` (in their dtype)."""
    return (features.float() * grad.float()).sum()
