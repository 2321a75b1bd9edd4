"""The run's start-up line: the model, precision, ZeRO stage and world, the steps and where an epoch's length
comes from, which loss with which options, and what the step's contrastive batch is."""

from __future__ import annotations

from fastclip.config import Config, LossConfig


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


def start_line(cfg: Config, *, params: int, runs: str, stage: int, device: str, world: str, ranks: int,
               steps: tuple[int, int], epoch: tuple[int, str], contrastive_batch: int, replay_last: bool | None,
               loss_kind: str) -> str:  # fmt: skip
    """The whole line. ``runs``: the precision the engine runs; ``world``: the ranks' layout; ``steps``: (total,
    per epoch); ``epoch``: (samples per epoch, where that count comes from); the rest as in the parts above."""
    k, micro = cfg.train.grad_accum, cfg.data.batch_size
    accumulation = accumulation_part(k, micro, ranks, contrastive_batch=contrastive_batch, replay_last=replay_last)
    return (
        f"fastclip: {cfg.model.name} ({params / 1e6:.1f}M params), {precision_part(cfg.train.precision, runs, device)}"
        f", ZeRO-{stage}, world: {world}; global batch {k * micro * ranks}, {steps[0]} steps ({steps[1]}/epoch, "
        f"{epoch[0]} samples/epoch from {epoch[1]}); {loss_part(cfg.loss, loss_kind)}; {accumulation}"
    )
