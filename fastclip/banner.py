"""The run's start-up line: the model, precision, ZeRO stage and world, the steps and where an epoch's length
comes from, which loss with which options, and what the step's contrastive batch is."""

from __future__ import annotations

from fastclip.config import LossConfig


def precision_part(asked: str, runs: str, device: str) -> str:
    """The precision the engine runs; where 'auto' chose fp32, why and how to force bf16."""
    if asked == "auto" and runs == "fp32":
        return f"fp32 (train.precision auto: no native bf16 on this {device}; --train.precision bf16 forces it)"
    return runs


def loss_part(loss: LossConfig, kind: str) -> str:
    """Which loss and which of the loss options are in effect (the other kind's are ignored)."""
    if kind == "siglip":
        return f"loss siglip (texts to every rank by '{loss.siglip_dist_impl}'; backend {loss.backend})"
    options = f"local_loss {loss.local_loss}, gather_with_grad {loss.gather_with_grad}"
    return f"loss clip ({options}; backend {loss.backend})"


def accumulation_part(k: int, micro: int, ranks: int, *, contrastive_batch: int, replay_last: bool | None) -> str:
    """``k`` micro batches of ``micro`` per rank: one loss over them (``replay_last`` says whether the last one is
    forwarded twice too), or each its own (``replay_last`` None: 'independent')."""
    if k == 1:
        return f"contrastive batch {contrastive_batch} ({micro} per rank)"
    if replay_last is None:
        return (
            f"contrastive batch {contrastive_batch}: accumulation 'independent', {k} micro batches of {micro} "
            f"per rank, each its own loss over {micro * ranks} samples"
        )
    replayed = "each" if replay_last else "the first one" if k == 2 else f"the first {k - 1}"
    return (
        f"contrastive batch {contrastive_batch}: accumulation 'contrastive', one loss over {k} micro "
        f"batches of {micro} per rank ({replayed} forwarded twice)"
    )
