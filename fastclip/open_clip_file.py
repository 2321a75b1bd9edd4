"""The open_clip.pt file: written atomically (into the first folder that takes it), and the open_clip call that
loads it as trained. Below both its writers, the trainer's checkpoints (fastclip/checkpoint.py) and the export
command (fastclip/export.py), so that neither imports the other for it."""

from __future__ import annotations

from pathlib import Path

import torch

from fastclip import run_folders
from fastclip.console import log
from fastclip.errors import CheckpointError


def write_open_clip(path: Path, state: dict[str, torch.Tensor], *, step: int, model: str) -> Path:
    """``state`` (fp32) as open_clip's checkpoint format, written atomically."""
    from fastclip.model import open_clip_state_dict

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"state_dict": open_clip_state_dict(state), "step": step, "model": model}, tmp)
    tmp.replace(path)
    return path


def how_to_load(path: Path, state: dict[str, torch.Tensor], *, model: str, force_image_size: int | None) -> str:
    """The line that announces an export: where it is and the open_clip statements that load it as trained.
    open_clip builds the architecture before it reads the file, so what the file cannot tell it goes in the call: a
    logit bias trained on an architecture without one (loss.kind siglip) needs ``init_logit_bias``, without which
    open_clip stops with "AttributeError: 'NoneType' object has no attribute 'ndim'"; a forced image size; the
    model-config JSON of an architecture open_clip does not ship."""
    import open_clip

    from fastclip.model import SIGLIP_INIT, config_to_register, resolve_model_name

    name, extra, why = resolve_model_name(model), "", ""
    if force_image_size:
        extra += f", force_image_size={force_image_size}"
    if "logit_bias" in state and (open_clip.get_model_config(name) or {}).get("init_logit_bias") is None:
        extra += f", init_logit_bias={SIGLIP_INIT['init_logit_bias']:g}"
        why = (f" (init_logit_bias: {name} has no logit bias of its own and this run trained one, loss.kind siglip; "
               "the file's value replaces the -10, and without it open_clip stops with AttributeError: 'NoneType' "
               "object has no attribute 'ndim')")  # fmt: skip
    calls = [f"open_clip.add_model_config({str(config)!r})"] if (config := config_to_register(model)) else []
    calls.append(f"open_clip.create_model_and_transforms({name!r}, pretrained={str(path.resolve())!r}{extra})")
    return f"open_clip weights: {path}; load them with: {'; '.join(calls)}{why}"


def write_export(folders: list[Path], state: dict[str, torch.Tensor], *, step: int, model: str) -> Path:
    """open_clip.pt in the first of ``folders`` that takes it; a write that fails is said, and the next tried."""
    failures = []
    for folder in folders:
        try:
            return write_open_clip(folder / "open_clip.pt", state, step=step, model=model)
        except (OSError, RuntimeError) as e:
            if not run_folders.write_failed(e):
                raise
            (folder / ".open_clip.pt.tmp").unlink(missing_ok=True)
            failures.append(f"{folder}: {' '.join(str(e).split())[:160]}")
            log.warning("open_clip.pt: could not write it to %s (%s)", folder, failures[-1])
    raise CheckpointError(
        f"open_clip.pt of step {step} could not be written anywhere ({'; '.join(failures)}); free space and rerun "
        "the export from the newest checkpoint: python -m fastclip.export"
    )
