"""open_clip.pt: the weights fastclip writes load in open_clip, with the call the run prints."""

import subprocess
import sys

import pytest
import torch

from fastclip.config import ModelConfig
from fastclip.model import build_model, open_clip_state_dict


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
