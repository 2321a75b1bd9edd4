"""open_clip's model options through fastclip's config: activation checkpointing, locked towers (LiT), patch
dropout (FLIP). Each does what open_clip's flag does, and the trainer honours it."""

from __future__ import annotations

import pytest
import torch

from fastclip.config import ModelConfig
from fastclip.errors import ConfigError
from fastclip.model import build_model, param_group_names

from runs import small_run_args, two_steps


def _batch(clip, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return torch.randn(n, 3, size, size, generator=g), torch.randint(1, 400, (n, clip.context_length), generator=g)


def test_grad_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        clip = build_model(ModelConfig(name="fastclip-tiny", grad_checkpointing=checkpointing))
        images, texts = _batch(clip)
        out = clip(images, texts)
        (out["image_features"] @ out["text_features"].T * out["logit_scale"]).logsumexp(1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in clip.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)


def test_patch_dropout_drops_the_fraction_in_training_only():
    clip = build_model(ModelConfig(name="fastclip-tiny", patch_dropout=0.5))
    seen = []
    clip.visual.patch_dropout.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape[1], out.shape[1])))
    images, texts = _batch(clip)
    clip.train()
    clip(images, texts)
    clip.eval()
    clip(images, texts)
    (tokens, kept), (tokens_eval, kept_eval) = seen
    patches = tokens - 1  # the class token is never dropped
    assert kept == 1 + int(patches * 0.5) and kept_eval == tokens_eval == tokens


def test_locked_towers_get_no_updates_and_no_optimizer_state(single_rank, world_dir, tmp_path):
    """LiT: the image tower locked but for its last group, the text tower trainable; after steps of the ZeRO-2
    engine the locked weights are unchanged, the others moved, and the optimizer holds only the trainable ones."""
    from fastclip.cli import parse_args
    from fastclip.trainer import Trainer

    extra = ["--model.lock_image", "true", "--model.lock_image_unlocked_groups", "1", "--log.every", "1000"]
    trainer = Trainer(parse_args(small_run_args(world_dir, tmp_path, steps=4) + extra), single_rank)
    try:
        before = {n: p.detach().clone() for n, p in trainer.clip.named_parameters()}
        trainable = {n for _, names in param_group_names(trainer.clip) for n in names}
        two_steps(trainer)
        after = dict(trainer.clip.named_parameters())
        state_numel = sum(p.numel() for g in trainer.engine.optimizer.bit16_groups for p in g)
    finally:
        trainer.close()
    locked = {n for n in before if n.startswith("visual.") and n not in trainable}
    assert locked and "visual.conv1.weight" in locked and "visual.proj" in trainable  # the last group: ln_post, proj
    assert all(torch.equal(after[n].detach(), before[n]) for n in locked)
    assert all(not after[n].requires_grad for n in locked)
    moved = [n for n in trainable if not torch.equal(after[n].detach(), before[n])]
    assert "text_projection" in moved and "visual.proj" in moved
    assert state_numel == sum(before[n].numel() for n in trainable)  # no optimizer state for a locked weight


def test_option_errors_name_the_field():
    with pytest.raises(ConfigError, match="model.lock_image / model.lock_text on fastclip-tiny: .*Unfreezing"):
        build_model(ModelConfig(name="fastclip-tiny", lock_text=True, lock_text_freeze_layer_norm=False))
    with pytest.raises(ConfigError, match="model.patch_dropout"):
        ModelConfig(patch_dropout=1.0)
    both = build_model(ModelConfig(name="fastclip-tiny", lock_image=True, lock_text=True))  # LiT's extreme: the
    assert [n for n, p in both.named_parameters() if p.requires_grad] == ["logit_scale"]  # temperature alone
