"""open_clip weights from a fastclip checkpoint: ``python -m fastclip.export CHECKPOINT_DIR --out FILE``.

CHECKPOINT_DIR is a step folder (``checkpoint.dir/step_XXXXXXXX``) or a checkpoint folder (the step its ``latest``
names). The weights are the fp32 masters, gathered from every rank's ZeRO partition (DeepSpeed's zero_to_fp32, for
ZeRO-1/2/3 and bf16 ZeRO-0) or read whole (fp32 ZeRO-0), without a process group or a GPU: a checkpoint of 64
ranks exports on a laptop. The file is what the trainer writes at the end of a run (``open_clip.pt``):
``{'state_dict': ...}``, which ``open_clip.create_model(NAME, pretrained=FILE)`` loads. Before it is written the
weights are loaded strictly into the architecture the checkpoint names, so a file that would not load is never
written.
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


def write_open_clip(path: Path, state: dict[str, torch.Tensor], *, step: int, model: str) -> Path:
    """``state`` (fp32) as open_clip's checkpoint format, written atomically."""
    from fastclip.model import open_clip_state_dict

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"state_dict": open_clip_state_dict(state), "step": step, "model": model}, tmp)
    tmp.replace(path)
    return path


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


def fp32_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every parameter's fp32 master (and the persistent buffers) from a step folder, on the CPU."""
    if any(folder.glob("*optim_states.pt")):  # partitioned fp32 masters: ZeRO-1/2/3, or bf16's ZeRO-0
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:  # fp32 ZeRO-0: the module's own weights are the masters
        (states,) = sorted(folder.glob("mp_rank_*_model_states.pt"))[:1] or [None]
        if states is None:
            raise ConfigError(f"{folder}: no mp_rank_00_model_states.pt: its save did not finish")
        state = torch.load(states, map_location="cpu", weights_only=False)["module"]
    return {
        name: t.detach().float().clone() if t.is_floating_point() else t.detach().clone() for name, t in state.items()
    }


def _check_loads(state: dict[str, torch.Tensor], run: dict[str, Any]) -> None:
    """Load ``state`` strictly into the architecture the checkpoint names (what open_clip will do with the file)."""
    from fastclip.config import ModelConfig
    from fastclip.model import _quiet_random_init, build_model

    with _quiet_random_init():
        clip = build_model(ModelConfig(name=run["model"], force_image_size=run.get("force_image_size")))
    try:
        clip.load_state_dict(state, strict=True)
    except RuntimeError as e:
        said = " ".join(str(e).split())[:400]
        raise ConfigError(f"the weights do not load into {run['model']}, the model the checkpoint names: {said}") from e


def export(where: str | Path, out: str | Path) -> Path:
    folder = step_folder(where)
    run = _saved_run(folder)
    state = fp32_weights(folder)
    bad = next(
        (name for name, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()), None
    )
    if bad is not None:
        raise ConfigError(f"{folder}: {bad} holds inf/NaN; export an earlier step folder")
    if run.get("model"):
        _check_loads(state, run)
    return write_open_clip(Path(out), state, step=int(run.get("step") or 0), model=run.get("model") or "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastclip.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step folder, or a checkpoint.dir (its 'latest' step)")
    parser.add_argument("--out", required=True, help="the open_clip file to write (e.g. open_clip.pt)")
    args = parser.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out)
    except ConfigError as e:
        print(f"fastclip.export: {e}", file=sys.stderr)
        return 2
    print(f"open_clip weights: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
