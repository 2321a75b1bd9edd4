"""``ClipLoss`` and ``SigLipLoss``: drop-ins for open_clip's (same arguments, values and gradients).

Loss = 1/2 (mean_i CE(L_i:, i) + mean_j CE(L_:j, j)) with L = s * a b^T. Across ranks, features are
all-gathered (with gradient if ``gather_with_grad``); with ``local_loss`` each rank scores only its own rows
against every column, labels offset by ``rank * n``, so the mean of the ranks' losses is the global loss.
Backends: ``auto`` (the fused op of fastclip.ops: C++ on CPU, Triton on CUDA; the N x N logits never exist),
``cpp``, ``triton`` (that kernel whatever the device) and ``torch`` (plain logits, the reference). All
accumulate in fp32 and return an fp32 loss whatever the features' dtype.

Fused form: loss = (sum_i row_lse_i + sum_i col_lse_i - 2 sum_i L_ii) / (2n), the LSEs from the op, the
diagonal targets L_ii = s a_i . b_i in plain torch (O(nD)), so autograd adds the -2I of dL = P_row + P_col - 2I.

SigLIP: loss = 1/n sum_i sum_j softplus(-y_ij (s a_i . b_j + bias)) over this rank's n images against every rank's
texts, y = +1 on the pairs, as open_clip's SigLipLoss sums it (its ranks' losses are not averaged: the gradient
reduction does that). The fused op (fastclip.ops.sigmoid_pair_loss) never holds the n x N logits. Texts reach the
other ranks by one all-gather with gradient (``dist_impl`` 'gather', the default; 'reduce' computes the same) or
around a ring of neighbour exchanges ('shift'; 'bidir' both ways, half the hops), one fused call per block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastclip.config import BACKENDS, DIST_IMPLS, LossConfig
from fastclip.distributed import all_gather_no_grad, all_gather_with_grad, exchange_with_grad


def _check_world(name: str, world_size: int) -> None:
    """A loss told of ``world_size`` ranks needs a process group of that many (its gathers assume it)."""
    if world_size == 1:
        return
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name}(world_size={world_size}) needs an initialized torch.distributed group")
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"{name}(world_size={world_size}) in a torch.distributed group of {dist.get_world_size()} ranks: pass "
            "the group's size and this process's rank"
        )


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    *,
    gather_with_grad: bool,
    local_loss: bool,
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's features, rank-major. Without grad they are constants, except (as open_clip has it) this
    rank's own block when every rank computes the whole loss (not ``local_loss``): a local loss already has its
    gradient through its rows."""
    if gather_with_grad:
        return all_gather_with_grad(image_features), all_gather_with_grad(text_features)
    images = list(all_gather_no_grad(image_features).chunk(world_size))
    texts = list(all_gather_no_grad(text_features).chunk(world_size))
    if not local_loss:
        images[rank], texts[rank] = image_features, text_features
    return torch.cat(images), torch.cat(texts)


def contrastive_loss_local(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    row_offset: int,
) -> torch.Tensor:
    """1/2 (CE(s a_r b_all^T, r + off) + CE(s b_r a_all^T, r + off)), fp32, mean over the local rows."""
    scale = logit_scale.float()
    labels = torch.arange(image_rows.shape[0], device=image_rows.device) + row_offset
    logits_per_image = scale * image_rows.float() @ text_all.float().T
    logits_per_text = scale * text_rows.float() @ image_all.float().T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def _targets(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """sum_i s x_i . y_i in fp32."""
    return scale * (x.float() * y.float()).sum()


def contrastive_loss_fused(
    image_rows: torch.Tensor,
    text_rows: torch.Tensor,
    image_all: torch.Tensor,
    text_all: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    row_offset: int,
    backend: str = "auto",
) -> torch.Tensor:
    """The value of :func:`contrastive_loss_local` from the fused LSE op, without the N x N logits."""
    from fastclip.ops import lse

    scale = logit_scale.float().reshape(())
    n = image_rows.shape[0]
    if image_rows is image_all and text_rows is text_all:  # rows are all columns: one pass gives both LSEs
        row, col = lse(image_all.contiguous(), text_all.contiguous(), scale, True, backend)
        return (row.sum() + col.sum() - 2 * _targets(image_all, text_all, scale)) / (2 * n)
    # local rows against gathered columns: two row-LSE problems, labels offset by row_offset
    row_i, _ = lse(image_rows.contiguous(), text_all.contiguous(), scale, False, backend)
    row_t, _ = lse(text_rows.contiguous(), image_all.contiguous(), scale, False, backend)
    cols = slice(row_offset, row_offset + n)
    targets = _targets(image_rows, text_all[cols], scale) + _targets(text_rows, image_all[cols], scale)
    return (row_i.sum() + row_t.sum() - targets) / (2 * n)


class ClipLoss(torch.nn.Module):
    """Same constructor and ``forward`` as ``open_clip.loss.ClipLoss``, plus ``backend`` (see the module doc).

    ``use_horovod`` is not supported.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if backend not in BACKENDS or backend == "open_clip":
            choices = ", ".join(b for b in BACKENDS if b != "open_clip")
            raise ValueError(f"ClipLoss(backend={backend!r}): choose one of {choices}")
        self.backend = backend
        if use_horovod:
            raise ValueError("ClipLoss(use_horovod=True): fastclip runs on torch.distributed only; drop use_horovod")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: labels are made on the fly, no cache needed
        self.rank = rank
        self.world_size = world_size

    def _check(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> None:
        if image_features.ndim != 2 or text_features.shape != image_features.shape:
            raise ValueError(
                f"ClipLoss: image_features and text_features must both be [N, D]; got {tuple(image_features.shape)} "
                f"and {tuple(text_features.shape)}"
            )
        if image_features.shape[0] == 0:
            raise ValueError("ClipLoss: image_features has N=0 rows; a contrastive loss needs at least one pair")
        if torch.as_tensor(logit_scale).numel() != 1:
            raise ValueError(f"ClipLoss: logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        _check_world("ClipLoss", self.world_size)

    def _loss(self, image_rows, text_rows, image_all, text_all, logit_scale, row_offset: int) -> torch.Tensor:
        if self.backend == "torch":
            return contrastive_loss_local(
                image_rows, text_rows, image_all, text_all, logit_scale, row_offset=row_offset
            )
        return contrastive_loss_fused(
            image_rows, text_rows, image_all, text_all, logit_scale, row_offset=row_offset, backend=self.backend
        )

    def forward(self, image_features, text_features, logit_scale, output_dict: bool = False):
        logit_scale = torch.as_tensor(logit_scale, device=image_features.device)  # open_clip takes a Python float too
        self._check(image_features, text_features, logit_scale)
        if self.world_size > 1:
            image_all, text_all = gather_features(
                image_features,
                text_features,
                gather_with_grad=self.gather_with_grad,
                local_loss=self.local_loss,
                rank=self.rank,
                world_size=self.world_size,
            )
            if self.local_loss:
                n = image_features.shape[0]
                loss = self._loss(image_features, text_features, image_all, text_all, logit_scale, self.rank * n)
            else:
                loss = self._loss(image_all, text_all, image_all, text_all, logit_scale, 0)
        else:
            loss = self._loss(image_features, text_features, image_features, text_features, logit_scale, 0)
        return {"contrastive_loss": loss} if output_dict else loss


def sigmoid_loss_local(
    image_rows: torch.Tensor, text_cols: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
    *, offset: int,
) -> torch.Tensor:  # fmt: skip
    """sum_ij softplus(-y_ij z_ij) with plain logits z = s a b^T + bias (fp32), y = +1 at j = i + offset: the
    reference (the n x N logits exist)."""
    logits = logit_scale.float() * image_rows.float() @ text_cols.float().T + logit_bias.float()
    labels = -torch.ones_like(logits)
    rows = torch.arange(image_rows.shape[0], device=logits.device)
    keep = rows + offset < text_cols.shape[0]
    labels[rows[keep], rows[keep] + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum()


class SigLipLoss(torch.nn.Module):
    """Same constructor and ``forward`` as ``open_clip.loss.SigLipLoss``, plus ``backend`` (see the module doc).

    ``dist_impl`` None is 'gather' here (open_clip's default is 'bidir'): one all-gather and one fused call over
    every rank's texts beat W - 1 exchanges of one block and W calls on a block each (benchmarks/bench_loss.py,
    test_siglip_dist_impl_cpu).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None,
                 backend: str = "auto"):  # fmt: skip
        super().__init__()
        if backend not in BACKENDS or backend == "open_clip":
            choices = ", ".join(b for b in BACKENDS if b != "open_clip")
            raise ValueError(f"SigLipLoss(backend={backend!r}): choose one of {choices}")
        self.dist_impl = dist_impl or "gather"
        if self.dist_impl not in DIST_IMPLS:
            raise ValueError(f"SigLipLoss(dist_impl={dist_impl!r}): choose one of {', '.join(DIST_IMPLS)}")
        self.cache_labels = cache_labels  # accepted for compatibility: labels are never built
        self.rank, self.world_size, self.backend = rank, world_size, backend

    def _pairs(self, images, texts, scale, bias, offset: int) -> torch.Tensor:
        if self.backend == "torch":
            return sigmoid_loss_local(images, texts, scale, bias, offset=offset)
        from fastclip.ops import sigmoid_pair_loss

        return sigmoid_pair_loss(images, texts, scale, bias, offset, self.backend)

    def _ring(self, images, texts, scale, bias) -> torch.Tensor:
        """Every other rank's texts, a block at a time around the ring (both ways for 'bidir'), no positives."""
        right, left = (self.rank + 1) % self.world_size, (self.rank - 1) % self.world_size
        none = texts.shape[0]  # an offset past the block's columns: no positive pairs
        total = self._pairs(images, texts, scale, bias, 0)
        to_right = to_left = texts
        hops = self.world_size - 1
        if self.dist_impl == "bidir":  # both ways at once: half the hops
            for _ in range(hops // 2):
                pair = exchange_with_grad(to_right, to_left, send_to=(right, left), recv_from=(left, right))
                to_right, to_left = pair
                total = total + self._pairs(images, to_right, scale, bias, none)
                total = total + self._pairs(images, to_left, scale, bias, none)
            hops %= 2
        for _ in range(hops):
            (to_right,) = exchange_with_grad(to_right, send_to=(right,), recv_from=(left,))
            total = total + self._pairs(images, to_right, scale, bias, none)
        return total

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        if image_features.ndim != 2 or text_features.shape != image_features.shape or not image_features.shape[0]:
            raise ValueError(
                f"SigLipLoss: image_features and text_features must both be [N, D] with N >= 1; got "
                f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        _check_world("SigLipLoss", self.world_size)
        device = image_features.device  # open_clip takes Python floats too
        scale = torch.as_tensor(logit_scale, device=device).float().reshape(())
        bias = (
            scale.new_zeros(())
            if logit_bias is None
            else torch.as_tensor(logit_bias, device=device).float().reshape(())
        )
        n = image_features.shape[0]
        if self.world_size == 1:
            total = self._pairs(image_features, text_features, scale, bias, 0)
        elif self.dist_impl in ("gather", "reduce"):
            texts = all_gather_with_grad(text_features)
            total = self._pairs(image_features, texts, scale, bias, self.rank * n)
        else:
            total = self._ring(image_features, text_features, scale, bias)
        loss = total / n
        return {"contrastive_loss": loss} if output_dict else loss


def build_loss(loss: LossConfig, *, rank: int, world_size: int, kind: str = "clip") -> torch.nn.Module:
    """The run's loss (``kind`` as resolved by :func:`fastclip.model.loss_kind`): fastclip's ClipLoss or SigLipLoss on
    ``loss.backend``, or open_clip's own for comparisons."""
    if kind == "siglip":
        if loss.backend == "open_clip":
            from open_clip.loss import SigLipLoss as OpenSigLipLoss

            return OpenSigLipLoss(rank=rank, world_size=world_size, dist_impl=loss.siglip_dist_impl)
        return SigLipLoss(rank=rank, world_size=world_size, dist_impl=loss.siglip_dist_impl, backend=loss.backend)
    kwargs = dict(local_loss=loss.local_loss, gather_with_grad=loss.gather_with_grad, rank=rank, world_size=world_size)
    if loss.backend == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss

        return OpenClipLoss(**kwargs)
    return ClipLoss(**kwargs, backend=loss.backend)
