import subprocess
import sys

import pytest
import torch

from fastclip.config import ModelConfig
from fastclip.errors import ConfigError
from fastclip.meters import Meters
from fastclip.model import build_model, image_spec, open_clip_state_dict, param_groups

from runs import ROOT


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


def test_exported_weights_load_in_open_clip(tmp_path):
    import open_clip

    clip = build_model(ModelConfig())
    with torch.no_grad():
        clip.logit_scale.fill_(3.3)
    path = tmp_path / "w.pt"
    torch.save({"state_dict": open_clip_state_dict(clip.state_dict())}, path)
    loaded = open_clip.create_model("fastclip-tiny", pretrained=str(path))
    assert loaded.logit_scale.shape == () and abs(loaded.logit_scale.item() - 3.3) < 1e-6
    again = build_model(ModelConfig(pretrained=str(path)))
    assert torch.equal(again.visual.conv1.weight, clip.visual.conv1.weight)


@pytest.mark.parametrize("siglip", [True, False])
def test_the_export_line_gives_the_open_clip_call_that_loads_it(tmp_path, siglip):
    """A SigLIP-trained export of an architecture without a logit bias fails open_clip's create_model(NAME,
    pretrained=FILE) with "'NoneType' object has no attribute 'ndim'" unless init_logit_bias is passed; open_clip
    builds the model before it reads the file, so the export names the call: run here as given, in a fresh process
    elsewhere (the demo architecture's config registered, the forced image size forced again)."""
    import subprocess
    import sys

    import open_clip

    from fastclip.open_clip_file import how_to_load, write_open_clip

    clip = build_model(ModelConfig(force_image_size=40), siglip=siglip)
    with torch.no_grad():
        clip.logit_scale.fill_(2.5)
        if siglip:
            clip.logit_bias.fill_(-7.5)
    state = {name: t.float() for name, t in clip.state_dict().items()}
    path = write_open_clip(tmp_path / "w.pt", state, step=1, model="fastclip-tiny")
    line = how_to_load(path, state, model="fastclip-tiny", force_image_size=40)
    assert line.startswith(f"open_clip weights: {path}; load them with: open_clip.add_model_config(")
    calls = line.split("load them with: ", 1)[1].split(" (init_logit_bias:", 1)[0]
    assert ("init_logit_bias=-10" in calls) == siglip == ("AttributeError" in line)
    *setup, create = calls.split("; ")
    code = "\n".join(["import open_clip", *setup, f"model = {create}[0]",
                      "print(float(model.logit_scale), model.logit_bias and float(model.logit_bias), "
                      "model.visual.image_size)"])  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2.5", "-7.5" if siglip else "None", "(40,", "40)"]
    if siglip:  # why the call carries it: open_clip's own error without it
        with pytest.raises(AttributeError, match="ndim"):
            open_clip.create_model_and_transforms("fastclip-tiny", pretrained=str(path), force_image_size=40)


def test_meters_average_on_device_and_reset():
    meters = Meters(["loss", "scale"], device=torch.device("cpu"))
    for v in (1.0, 2.0, 6.0):
        meters["loss"].update(torch.tensor(v), n=2)
    meters["scale"].update(3.0)
    assert meters.collect() == {"loss": pytest.approx(3.0), "scale": pytest.approx(3.0)}
    out = meters.collect()
    assert out["loss"] != out["loss"]  # nothing since the reset: nan, not a stale number


def test_tf32_only_on_cuda():
    from fastclip.precision import configure_matmuls

    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark)
    try:
        configure_matmuls(torch.device("cpu"), tf32=True)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
        configure_matmuls(torch.device("cuda", 0), tf32=False)
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark) == before
        configure_matmuls(torch.device("cuda", 0), tf32=True)  # flags only: no device needed
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.benchmark
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_global_torch_flags_are_restored_after_each_test(tmp_path):
    """The root conftest's restore_torch_flags puts back what a test changed (a Trainer on CUDA turns TF32 and
    cuDNN autotuning on), so no test's numbers depend on which tests ran before it: two tests in order, the
    first changing the flags, under a copy of the root conftest, in a pytest of their own (run alone, as with -k,
    the check would pass whether or not anything was restored)."""
    (tmp_path / "conftest.py").write_text((ROOT / "conftest.py").read_text())
    (tmp_path / "test_order.py").write_text(
        "import torch\n\n"
        "def test_1_changes_them():\n"
        "    torch.set_float32_matmul_precision('high')\n"
        "    torch.backends.cudnn.benchmark = True\n\n"
        "def test_2_finds_them_restored():\n"
        "    assert torch.get_float32_matmul_precision() == 'highest' and not torch.backends.cudnn.benchmark\n"
    )
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-2000:]


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


def test_retrieval_recalls_equal_open_clips_metrics():
    """R@1, R@5, R@10 both ways as open_clip_train's get_clip_metrics gives them, in row chunks smaller than the set."""
    from open_clip_train.train import get_clip_metrics

    from fastclip.eval import _recall_at

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(images + 1.2 * torch.randn(300, 32, generator=g), dim=-1)
    theirs = get_clip_metrics(images, texts, 1.0)
    for name, (queries, keys) in (("image_to_text", (images, texts)), ("text_to_image", (texts, images))):
        ours = _recall_at(queries, keys, chunk=64)
        assert 0 < ours[1] < ours[5] < ours[10] < 1
        for k, recall in ours.items():
            assert recall == pytest.approx(float(theirs[f"{name}_R@{k}"]), abs=1e-12), (name, k)
