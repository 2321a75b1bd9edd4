"""fastclip's bf16 train step does open_clip's work and no more: its towers' matmul FLOPs (forward and backward)
equal open_clip's under autocast, every matmul, convolution and attention of the step runs on bf16 operands, and
those ops, the LayerNorms and the fused loss get 16-byte aligned operands laid out as open_clip's step lays out
the same calls' (issue 28).

Checked on the CPU, op by op as the dispatcher sees them, because on a GPU each failure is a silent slowdown,
not an error: a stray fp32 matmul runs at a sixteenth of the bf16 tensor-core rate, recomputed or duplicated
work costs its FLOPs again, a misaligned bias or LayerNorm weight rules out the fused or vectorized kernels. Nothing
is timed here (benchmarks/bench_train_step.py times the step).
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from runs import small_run_args

# the ops that run on tensor cores on a GPU (aten names; SDPA's CPU and CUDA variants share the prefix)
MATMUL_OPS = ("mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward")
ATTENTION_PREFIX = "_scaled_dot_product"


# the ops whose kernels care how their operands lie in memory: tensor-core GEMMs (cuBLASLt's bias epilogue wants
# an aligned bias), the vectorized LayerNorm kernels (aligned input, gamma and beta), attention, and fastclip's own
# loss kernels; matmul and linear are composite and decompose into the others, listed in case a path keeps them
LAYOUT_OPS = MATMUL_OPS + ("matmul", "linear", "native_layer_norm", "native_layer_norm_backward")
ALIGNMENT = 16  # bytes: the vector width of those kernels' loads


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, with the CPU attention kernel's formulas (it has the CUDA kernels' only): attention's
    two matmuls a head, forward and backward, count on both sides."""
    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    })  # fmt: skip


class OperandDtypes(TorchDispatchMode):
    """The floating dtypes of each matmul-class op's operands, by op name. Attention's 4-D tensors are its
    operands (query, key, value, output and their gradients); its 3-D log-sum-exp is kept in fp32 by design."""

    def __init__(self):
        super().__init__()
        self.seen: dict[str, set[torch.dtype]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in MATMUL_OPS or name.startswith(ATTENTION_PREFIX):
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and t.is_floating_point()]
            if name.startswith(ATTENTION_PREFIX):
                tensors = [t for t in tensors if t.dim() == 4]
            self.seen.setdefault(name, set()).update(t.dtype for t in tensors)
        return func(*args, **(kwargs or {}))


@dataclass(frozen=True)
class Operand:
    index: int  # among the call's tensor arguments, in order
    name: str  # the op schema's name for its argument
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # data_ptr() modulo ALIGNMENT
    contiguous: bool

    @property
    def layout(self) -> tuple[int | None, ...]:
        """The strides that say how the elements lie: a dimension of size 1 has any stride, so none."""
        return tuple(None if n == 1 else s for n, s in zip(self.shape, self.stride))

    def __str__(self) -> str:
        return (f"#{self.index} {self.name} shape {list(self.shape)} stride {list(self.stride)} "
                f"at +{self.offset} mod {ALIGNMENT}")  # fmt: skip


@dataclass(frozen=True)
class Call:
    namespace: str  # aten, or fastclip for its own ops
    op: str  # the op's name, without its overload
    operands: tuple[Operand, ...]

    @property
    def key(self) -> tuple:
        """What matches a call to open_clip's: the calls of the two steps run in different orders."""
        return self.op, tuple(o.shape for o in self.operands)


# aten's argument names that do not say what the operand is
ROLES = {("addmm", "self"): "self (the bias)"}


def _named_tensors(func, args, kwargs) -> list[tuple[str, torch.Tensor]]:
    """A call's tensor arguments in order, each with its argument's name (indexed within a list argument)."""
    bound = {**dict(zip((a.name for a in func._schema.arguments), args)), **(kwargs or {})}
    named = []
    for arg, value in bound.items():
        name = ROLES.get((func.overloadpacket.__name__, arg), arg)
        tensors = [t for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
        named += [(f"{name}[{i}]" if isinstance(value, (list, tuple)) else name, t) for i, t in enumerate(tensors)]
    return named


class OperandLayouts(TorchDispatchMode):
    """Each layout-sensitive op call (LAYOUT_OPS, attention, fastclip's ops) with its tensor operands' layouts."""

    def __init__(self):
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in LAYOUT_OPS or name.startswith(ATTENTION_PREFIX) or func.namespace == "fastclip":
            operands = tuple(
                Operand(i, arg, tuple(t.shape), tuple(t.stride()), t.data_ptr() % ALIGNMENT, t.is_contiguous())
                for i, (arg, t) in enumerate(_named_tensors(func, args, kwargs))
            )
            self.calls.append(Call(func.namespace, name, operands))
        return func(*args, **(kwargs or {}))


# operands of fastclip's loss ops (which open_clip has no counterpart of) that may come strided: the loss's sum
# hands back its LSEs' gradients expanded (stride 0), and both kernels copy them .float().contiguous() before reading
# them (fastclip/ops.py, kernels/contrastive_lse.py): n floats, never read strided
STRIDED_BY_DESIGN = {"contrastive_lse_backward": ("grad_row", "grad_col")}


def _fed_differently(ours: list[Call], theirs: list[Call]) -> list[tuple[Call, Operand, str]]:
    """Each operand of ``ours`` that is off a 16-byte boundary, or not contiguous where open_clip's operand of a
    call of the same op and shapes is laid out otherwise (open_clip's own strided operands, a transposed weight
    in mm, are the layouts its kernels run on): (call, operand, what is wrong)."""
    theirs_layouts: dict[tuple, set] = {}
    for call in theirs:
        for o in call.operands:
            theirs_layouts.setdefault((call.key, o.index), set()).add(o.layout)
    found = []
    for call in ours:
        for o in call.operands:
            seen = theirs_layouts.get((call.key, o.index), set())
            if o.offset:
                found.append((call, o, "misaligned"))
            elif not (o.contiguous or o.layout in seen or o.name in STRIDED_BY_DESIGN.get(call.op, ())):
                what = f"open_clip's strides {' or '.join(map(str, seen))}" if seen else "no such call in open_clip's"
                found.append((call, o, f"not contiguous ({what})"))
    return found


def _report(found: list[tuple[Call, Operand, str]], calls: int, first: int = 12) -> str:
    """How many operands of which ops went wrong how, then the first ``first`` of them in call order."""
    kinds = Counter(f"{call.op} {o.name} {what.split(' (')[0]}" for call, o, what in found)
    lines = [f"{call.op} {o}: {what}" for call, o, what in found[:first]]
    summary = ", ".join(f"{kind} x{n}" for kind, n in kinds.most_common())
    return f"{len(found)} operands of {calls} calls fed unlike open_clip's step ({summary}); the first:\n" + "\n".join(
        lines
    )


def _fastclip_step(world, world_dir, tmp_path, extra: tuple[str, ...] = ()):
    """A warmed-up bf16 ZeRO-2 trainer (the tiny model unless ``extra`` says otherwise) and a function running one
    step on a fixed batch."""
    from fastclip.cli import parse_args
    from fastclip.data.batch import Batch
    from fastclip.trainer import Trainer

    args = small_run_args(world_dir, tmp_path, steps=10) + ["--log.every", "1000", "--train.precision", "bf16"]
    trainer = Trainer(parse_args(args + list(extra)), world)
    batch = next(iter(trainer.train_loader))
    fixed = itertools.repeat(Batch(images=batch.images, texts=batch.texts))
    trainer.train_step(fixed)  # the first step allocates the optimizer's state
    return trainer, batch, lambda: trainer.train_step(fixed)


def _open_clip_step(cfg, batch, mode: TorchDispatchMode) -> dict[str, torch.Tensor]:
    """open_clip's forward and backward of the same architecture under autocast bf16 (open_clip_train's
    amp_bf16), with ClipLoss, inside ``mode``; the model's output."""
    import open_clip

    from fastclip.model import resolve_model_name

    model = open_clip.create_model(resolve_model_name(cfg.model.name), output_dict=True,
                                   force_image_size=cfg.model.force_image_size)  # fmt: skip
    model.train()
    with mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch.images, batch.texts)
            loss = open_clip.ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"].exp())
        loss.backward()
    return out


def _open_clip_flops(cfg, batch) -> tuple[int, int]:
    """open_clip's step (:func:`_open_clip_step`): (total FLOPs, the FLOPs of the loss's logits)."""
    counter = _flop_counter()
    out = _open_clip_step(cfg, batch, counter)
    n, d = out["image_features"].shape
    # ClipLoss on one rank: image @ text.T and text @ image.T forward; each matmul's two input gradients backward
    return counter.get_total_flops(), 2 * (2 * n * n * d) * 3


def test_bf16_step_does_open_clips_matmul_work_in_bf16(single_rank, world_dir, tmp_path):
    trainer, batch, step = _fastclip_step(single_rank, world_dir, tmp_path)
    try:
        assert trainer.precision == "bf16" and trainer.stage == 2
        dtypes = OperandDtypes()
        with _flop_counter() as counter, dtypes:
            step()
        ours = counter.get_total_flops()  # the fused loss's logits are inside its own op, not counted here
    finally:
        trainer.close()
    assert {"mm", "addmm", "convolution", "convolution_backward"} <= dtypes.seen.keys(), dtypes.seen
    assert any(name.startswith(ATTENTION_PREFIX) for name in dtypes.seen), dtypes.seen
    not_bf16 = {name: kinds for name, kinds in dtypes.seen.items() if kinds != {torch.bfloat16}}
    assert not not_bf16, f"matmul-class ops with operands not in bf16: {not_bf16}"
    attention = sum(n for op, n in counter.get_flop_counts()["Global"].items() if "attention" in str(op))
    assert attention > 0, counter.get_flop_counts()["Global"]  # the towers' attention is in the count
    theirs, logits = _open_clip_flops(trainer.cfg, batch)
    assert ours == theirs - logits, (ours, theirs, logits)


# ViT-B/32's shape (12 layers a tower, 32 px patches, 77 tokens) at a narrow width; with two heads a tower, as
# ViT-B/32 has several (one head leaves the head dimension of size 1, whose stride says nothing), and its
# tokenizer's vocabulary (the loader's texts use all of it)
NARROW_B32 = Path(__file__).parents[1] / "benchmarks" / "model_configs" / "ViT-B-32-narrow.json"


def test_bf16_step_feeds_its_kernels_aligned_operands_laid_out_as_open_clips(single_rank, world_dir, tmp_path):
    """Every matmul, LayerNorm, attention and loss call of a ViT-B/32-shaped bf16 ZeRO-2 step, forward and
    backward, gets 16-byte aligned operands laid out as open_clip's step lays out the same call's.

    Why: ZeRO-1/2 make each parameter a view into a flat buffer; one odd-sized tensor early in it shifted every
    later bias and LayerNorm weight 2 bytes off (issue 28), which on a GPU silently costs cuBLASLt's fused-bias
    kernels and the vectorized LayerNorm ones. open_clip never sees it: autocast makes fresh, aligned copies."""
    arch = json.loads(NARROW_B32.read_text())
    arch["vision_cfg"]["head_width"] = arch["vision_cfg"]["width"] // 2
    arch["text_cfg"].update(heads=2, vocab_size=49408)
    model = tmp_path / "ViT-B-32-narrow-2heads.json"
    model.write_text(json.dumps(arch))
    image = str(arch["vision_cfg"]["image_size"])  # 2 x 2 patches and the class token
    trainer, batch, step = _fastclip_step(single_rank, world_dir, tmp_path,
                                          ("--model.name", str(model), "--model.force_image_size", image))  # fmt: skip
    try:
        assert trainer.precision == "bf16" and trainer.stage == 2  # ZeRO-2's flat buffers: where it went wrong
        ours = OperandLayouts()
        with ours:
            step()
    finally:
        trainer.close()
    theirs = OperandLayouts()
    _open_clip_step(trainer.cfg, batch, theirs)

    ops = {call.op for call in ours.calls}
    wanted = {"convolution", "convolution_backward", "mm", "addmm", "native_layer_norm", "native_layer_norm_backward"}
    assert wanted <= ops, ops  # the images' patch embedding, the towers' Linears and LayerNorms, forward and back
    attention = {op for op in ops if op.startswith(ATTENTION_PREFIX)}
    assert len(attention) == 2, ops  # forward and backward: the query, key and value of open_clip's MHA
    assert {"contrastive_lse", "contrastive_lse_backward"} <= ops, ops  # the fused loss's features
    # every aten call has one of open_clip's with the same op and shapes, so each layout is compared like for like
    # (open_clip's extra calls are its loss's logits, which fastclip's fused loss never forms)
    unmatched = {call.key for call in ours.calls if call.namespace == "aten"} - {call.key for call in theirs.calls}
    assert not unmatched, f"calls open_clip's step does not make: {sorted(unmatched)}"

    found = _fed_differently(ours.calls, theirs.calls)
    assert not found, _report(found, len(ours.calls))


def test_operand_check_flags_what_open_clip_feeds_otherwise():
    """The check above can fail on each count: an operand strided where open_clip's is contiguous, one off a 16-byte
    boundary; and passes open_clip's own strided layouts (a transposed weight)."""
    x, w = torch.randn(8, 16), torch.randn(32, 16)
    theirs, ours = OperandLayouts(), OperandLayouts()
    with theirs:
        torch.mm(x, w.t())
    with ours:
        torch.mm(x, w.t())  # open_clip's layout, its transposed weight included
        torch.mm(x.t().contiguous().t(), w.t())  # column-major input
        torch.mm(torch.randn(8 * 16 + 1)[1:].view(8, 16), w.t())  # contiguous, 4 bytes past an aligned address
    found = _fed_differently(ours.calls, theirs.calls)
    assert [(o.name, what) for _, o, what in found] == [
        ("self", "not contiguous (open_clip's strides (16, 1))"),
        ("self", "misaligned"),
    ], _report(found, len(ours.calls))
    assert "mm #0 self shape [8, 16] stride [1, 8] at +0 mod 16: not contiguous" in _report(found, len(ours.calls))
