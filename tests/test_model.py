"""open_clip models by name or JSON, their AdamW parameter groups, and their FLOPs per sample."""

import pytest
import torch

from fastclip.config import ModelConfig
from fastclip.errors import ConfigError
from fastclip.model import build_model, image_spec, param_groups


def test_param_groups_decay_matrices_and_embeddings_not_biases_norms_or_the_logit_scale():
    clip = build_model(ModelConfig())
    decay, no_decay = param_groups(clip, weight_decay=0.1)
    names = {id(p): n for n, p in clip.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert names[id(no_decay["params"][-1])] == "logit_scale"  # last: its 1 element shifts no other
    assert "token_embedding.weight" in decay_names and "positional_embedding" in decay_names  # open_clip_train's
    assert "visual.class_embedding" in no_decay_names  # 1-d
    assert all(not any(k in n for k in ("ln_", "bias", "logit")) for n in decay_names)
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert any("attn.in_proj_weight" in n for n in decay_names)
    assert len(decay_names) + len(no_decay_names) == len(list(clip.parameters()))


def test_model_by_json_and_errors(tmp_path):
    import json

    from fastclip.model import _BUILTIN_CONFIGS

    cfg = json.loads((_BUILTIN_CONFIGS / "fastclip-tiny.json").read_text())
    cfg["vision_cfg"]["image_size"] = 40
    path = tmp_path / "my-arch.json"
    path.write_text(json.dumps(cfg))
    assert image_spec(build_model(ModelConfig(name=str(path)))).size == 40
    with pytest.raises(ConfigError, match="model.name.*ViT-B-32"):
        build_model(ModelConfig(name="ViT-B-23"))
    with pytest.raises(ConfigError, match="model.name.*does not exist"):
        build_model(ModelConfig(name=str(tmp_path / "nope.json")))


@pytest.mark.parametrize("name, gflops", [("ViT-B-32", 44.34), ("ViT-B-16", 123.27), ("ViT-L-14", 526.0)])
def test_training_flops_per_sample_match_the_published_counts(name, gflops):
    """open_clip's model profile (forward GFLOPs 14.78, 41.09, 175.33 at 224 px) times 3 for a training sample;
    counted from the architecture on the meta device, so even ViT-L costs no memory."""
    from fastclip.mfu import train_flops_per_sample

    assert train_flops_per_sample(ModelConfig(name=name)) / 1e9 == pytest.approx(gflops, rel=0.02)


def test_flops_follow_the_image_size_and_peaks_come_from_the_card_or_the_config():
    from fastclip.mfu import peak_flops, peak_memory_gb, train_flops_per_sample

    at_224 = train_flops_per_sample(ModelConfig(name="ViT-B-16"))
    at_336 = train_flops_per_sample(ModelConfig(name="ViT-B-16", force_image_size=336))
    assert 2.1 < at_336 / at_224 < 2.25  # image tokens grow 2.25x (attention faster); the text tower stays
    flip = train_flops_per_sample(ModelConfig(name="ViT-B-16", patch_dropout=0.5))
    assert 0.5 < flip / at_224 < 0.6  # half the patches: half the image tower, all of the text tower
    cpu = torch.device("cpu")
    assert peak_flops(cpu, None) is None and peak_flops(cpu, 312.0) == 312e12
    assert peak_memory_gb(cpu) is None
