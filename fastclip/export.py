"""open_clip weights from a fastclip checkpoint: ``python -m fastclip.export CHECKPOINT_DIR --out FILE``.

CHECKPOINT_DIR is a step folder (``checkpoint.dir/step_XXXXXXXX``) or a checkpoint folder (the step its ``latest``
names). The weights are the fp32 masters, gathered from every rank's ZeRO partition (DeepSpeed's zero_to_fp32, for
ZeRO-1/2/3 and bf16 ZeRO-0) or read whole (fp32 ZeRO-0), without a process group or a GPU: a checkpoint of 64 ranks
exports on a laptop. The file is what the trainer writes at the end of a run (``open_clip.pt``): ``{'state_dict':
...}``, which ``open_clip.create_model(NAME, pretrained=FILE)`` loads (a run of an architecture without a logit bias
trained with ``loss.kind siglip`` has one: add ``init_logit_bias=-10``, which the file overrides); the command prints
the exact call (:func:`how_to_load`). Before it is written the weights are loaded strictly into the architecture the
checkpoint names, so a file that would not load is never written.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import torch

from fastclip.errors import ConfigError
from fastclip.open_clip_file import how_to_load, write_open_clip


def step_folder(where: str | Path) -> Path:
    """The step folder ``where`` names: itself, or the one its ``latest`` points to."""
    from fastclip.checkpoint import read_latest

    path = Path(where)
    if not path.is_dir():
        raise ConfigError(f"{where}: no such checkpoint folder")
    if (tag := read_latest(path)) is not None:
        return path / tag
    if any(path.glob("*model_states.pt")):
        return path
    raise ConfigError(f"{where}: neither a step folder (no *model_states.pt) nor a checkpoint.dir (no 'latest' file)")


def _saved_run(folder: Path) -> dict[str, Any]:
    """The model name and step the folder was saved with: fastclip.json, or (older folders) the client state."""
    from fastclip.checkpoint import read_meta

    if (meta := read_meta(folder)) is not None:
        return meta
    states = sorted(folder.glob("*model_states.pt"))
    client = torch.load(states[0], map_location="cpu", weights_only=False)
    model = client.get("config", {}).get("model", {})
    return {"model": model.get("name"), "force_image_size": model.get("force_image_size"), "step": client.get("step")}


def fp32_weights(folder: Path, clip: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master (and the persistent buffers) from a step folder, on the CPU. ``clip``: the
    architecture the folder holds, which names bf16 ZeRO-0's masters (built from the folder's record if None)."""
    try:
        state = _partitioned(folder) if any(folder.glob("*optim_states.pt")) else _whole(folder, clip)
    except ConfigError:
        raise
    except Exception as e:  # DeepSpeed's ValueError, FileNotFoundError, AssertionError on a partial folder
        said = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"{folder}: DeepSpeed cannot read it ({type(e).__name__}: {said}); its save did not finish?"
        ) from e
    return {name: (t.float() if t.is_floating_point() else t).detach().clone() for name, t in state.items()}


def _partitioned(folder: Path) -> dict[str, torch.Tensor]:
    """ZeRO-1/2/3: the fp32 masters gathered from every rank's partition (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)


def _whole(folder: Path, clip: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """ZeRO-0: the module's weights, with bf16's fp32 masters (its optimizer's, group by group in the order of
    fastclip's parameter groups) in place of the bf16 copies."""
    path = folder / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ConfigError(f"{folder}: no mp_rank_00_model_states.pt or *optim_states.pt: its save did not finish")
    states = torch.load(path, map_location="cpu", weights_only=False)
    module = dict(states["module"])
    masters = (states.get("optimizer") or {}).get("fp32_groups")
    if not masters:
        return module  # fp32: the module's weights are the masters
    from fastclip.checkpoint import read_meta
    from fastclip.model import saved_layout

    meta = read_meta(folder)
    groups = [names for _, names in saved_layout(meta, clip if clip is not None else _model(_saved_run(folder)))]
    if [len(g) for g in groups] != [len(t) for t in masters]:
        raise ConfigError(f"{folder}: its bf16 optimizer's parameter groups do not match the model it names")
    for names, tensors in zip(groups, masters):
        module.update({name: t.reshape(module[name].shape) for name, t in zip(names, tensors)})
    return module


def _model(run: dict[str, Any]) -> torch.nn.Module:
    """The architecture a checkpoint names, as the trainer built it (fp32, CPU)."""
    from fastclip.config import ModelConfig
    from fastclip.model import _quiet_random_init, build_model

    with _quiet_random_init():
        model = ModelConfig(name=run["model"], force_image_size=run.get("force_image_size"))
        return build_model(model, siglip=run.get("loss_kind") == "siglip")


def _check_loads(state: dict[str, torch.Tensor], clip: torch.nn.Module, name: str) -> None:
    """Load ``state`` strictly into ``clip`` (what open_clip will do with the file)."""
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as e:
        said = " ".join(str(e).split())[:400]
        raise ConfigError(f"the weights do not load into {name}, the model the checkpoint names: {said}") from e


def export(where: str | Path, out: str | Path) -> str:
    """Write ``where``'s weights to ``out``; the line that says where and how open_clip loads them."""
    folder = step_folder(where)
    run = _saved_run(folder)
    clip = _model(run) if run.get("model") else None
    state = fp32_weights(folder, clip)
    bad = next(
        (name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()), None
    )
    if bad is not None:
        raise ConfigError(f"{folder}: {bad} holds inf/NaN; export an earlier step folder")
    if clip is not None:
        _check_loads(state, clip, run["model"])
    path = write_open_clip(Path(out), state, step=int(run.get("step") or 0), model=run.get("model") or "")
    if not run.get("model"):  # a folder too old to name its model: no call to give
        return f"open_clip weights: {path}"
    return how_to_load(path, state, model=run["model"], force_image_size=run.get("force_image_size"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastclip.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step folder, or a checkpoint.dir (its 'latest' step)")
    parser.add_argument("--out", required=True, help="the open_clip file to write (e.g. open_clip.pt)")
    args = parser.parse_args(argv)
    try:
        print(export(args.checkpoint, args.out))
    except ConfigError as e:
        print(f"fastclip.export: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
