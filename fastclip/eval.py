"""Evaluation on the val shards: val loss, zero-shot top-1 and top-5 over class prompts, image<->text R@1, R@5
and R@10 (open_clip's retrieval metrics).

Each rank encodes its part of the val set; features are gathered so that retrieval and zero-shot are
scored over the whole set, the same numbers on every rank.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastclip.errors import ConfigError
from fastclip.loss import contrastive_loss_local, sigmoid_loss_local
from fastclip.model import loss_scalars


@dataclass
class EarlyStopping:
    """Stop when the val loss (the run's: clip or siglip) has not improved by more than ``min_delta`` for
    ``patience`` evaluations."""

    patience: int  # 0: never stop early
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0

    def update(self, val_loss: float | None, step: int) -> bool:
        """Record an evaluation; True when training should stop."""
        if not self.patience or val_loss is None:
            return False
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.evals_since_best = val_loss, step, 0
            return False
        self.evals_since_best += 1
        return self.evals_since_best >= self.patience

    def stop_record(self, step: int, loss_kind: str) -> tuple[dict[str, Any], str]:
        """The metrics record and the console line of an early stop at ``step``."""
        record = {
            "step": step,
            "early_stop": True,
            f"val/best_{loss_kind}_loss": self.best,
            "val/best_step": self.best_step,
        }
        line = (
            f"early stop at step {step}: val {loss_kind} loss has not improved on {self.best:.4f} (step "
            f"{self.best_step}) by more than {self.min_delta} in {self.patience} evaluations"
        )
        return record, line

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "evals_since_best": self.evals_since_best}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The count goes on across a resume; patience and min delta stay this run's."""
        self.best, self.best_step = state["best"], state["best_step"]
        self.evals_since_best = state["evals_since_best"]


def zeroshot_lists(data, *, enabled: bool) -> tuple[list[str] | None, list[str] | None]:
    """The class names and templates of ``data`` (a DataConfig) for zero-shot scoring, or (None, None)."""
    if not (enabled and data.zeroshot_classnames and data.zeroshot_templates):
        return None, None
    return (
        read_zeroshot_list(data.zeroshot_classnames, field="data.zeroshot_classnames"),
        read_zeroshot_list(data.zeroshot_templates, field="data.zeroshot_templates"),
    )


def read_zeroshot_list(path: str, *, field: str) -> list[str]:
    """Class names or prompt templates: a non-empty JSON list of strings (a class's index is its KEY.cls)."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{field}: cannot read a JSON list from {path!r}: {e}") from e
    if not isinstance(items, list) or not items or not all(isinstance(x, str) for x in items):
        raise ConfigError(f"{field}: {path!r} must hold a non-empty JSON list of strings")
    return items


def _gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` [n_r, ...] over ranks, where n_r may differ from rank to rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]  # note: a host sync, at eval time only
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


RECALL_AT = (1, 5, 10)


def _recall_at(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 4096) -> dict[int, float]:
    """R@k for k in RECALL_AT: the fraction of rows i whose key i is among their k nearest keys (its rank: how many
    keys score above it, as open_clip's argsort ranks them); row chunks keep memory at chunk x M."""
    hits = torch.zeros(len(RECALL_AT), dtype=torch.long, device=queries.device)
    ks = torch.tensor(RECALL_AT, device=queries.device)
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ keys.T
        rows = torch.arange(sims.shape[0], device=sims.device)
        rank = (sims > sims[rows, rows + start, None]).sum(dim=1)
        hits += (rank[:, None] < ks[None, :]).sum(dim=0)
    n = max(queries.shape[0], 1)
    return {k: h / n for k, h in zip(RECALL_AT, hits.tolist())}  # note: a host sync, at eval time only


@torch.no_grad()
def zeroshot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: list[str],
    templates: list[str],
    *,
    device: torch.device,
) -> torch.Tensor:
    """[C, D] unit class embeddings: the mean of each class's normalized prompt embeddings, renormalized."""
    weights = []
    for name in classnames:
        texts = tokenizer([t.format(name) for t in templates]).to(device)
        emb = model.encode_text(texts, normalize=True).float()
        weights.append(torch.nn.functional.normalize(emb.mean(dim=0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable,  # yields fastclip.data.batch.Batch
    *,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: list[str] | None,
    templates: list[str] | None,
    device: torch.device,
    dtype: torch.dtype,
    loss_kind: str = "clip",
) -> dict[str, float]:
    """Val metrics; the val loss is the run's (``val/clip_loss`` or ``val/siglip_loss``), within each val batch."""
    was_training = model.training
    model.eval()
    image_feats, text_feats, labels = [], [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for batch in loader:
        out = model(batch.images.to(dtype), batch.texts)
        img, txt = out["image_features"].float(), out["text_features"].float()
        scalars = loss_scalars(out)
        if loss_kind == "siglip":  # its loss is a sum over the batch's pairs / n: times n, the sum
            loss_sum += sigmoid_loss_local(img, txt, *scalars.values(), offset=0).double()
        else:
            scale = scalars["logit_scale"]
            loss_sum += contrastive_loss_local(img, txt, img, txt, scale, row_offset=0).double() * len(img)
        count += img.shape[0]
        image_feats.append(img)
        text_feats.append(txt)
        if batch.labels is not None:
            labels.append(batch.labels.to(device))
    d = model.text_projection.shape[-1] if hasattr(model, "text_projection") else 0
    empty = torch.zeros((0, d), device=device)
    images = _gather_rows(torch.cat(image_feats) if image_feats else empty)
    texts = _gather_rows(torch.cat(text_feats) if text_feats else empty)
    all_labels = _gather_rows(torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device))
    totals = torch.stack([loss_sum, count])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    loss_total, n = totals.tolist()  # note: a host sync, at eval time only

    metrics = {"val/samples": float(images.shape[0]), f"val/{loss_kind}_loss": loss_total / n if n else float("nan")}
    if images.shape[0]:
        for name, (queries, keys) in (("image_to_text", (images, texts)), ("text_to_image", (texts, images))):
            for k, recall in _recall_at(queries, keys).items():
                metrics[f"val/{name}_R@{k}"] = recall
    known = all_labels >= 0
    if classnames and templates and images.shape[0] and bool(known.any()):
        weights = zeroshot_classifier(model, tokenizer, classnames, templates, device=device)
        top = (images[known] @ weights.T).topk(min(5, len(classnames)), dim=1).indices
        hit = top == all_labels[known][:, None]
        metrics["val/zeroshot_top1"] = float(hit[:, 0].float().mean())
        metrics["val/zeroshot_top5"] = float(hit.any(dim=1).float().mean())  # all classes when there are fewer
        metrics["val/zeroshot_chance"] = 1.0 / len(classnames)
    model.train(was_training)
    return metrics
