"""Checkpoints: the folder, its ``latest`` pointer, save, prune, resume, and the open_clip export.

``checkpoint.dir/step_XXXXXXXX/`` holds a DeepSpeed checkpoint (the engine: weights, optimizer, scheduler), the
train state (:class:`TrainState`, as DeepSpeed's client state) and each rank's position in its train stream
(``data_rankNNNNN.json``). ``latest`` names the newest complete folder.

fastclip writes ``latest`` itself rather than through DeepSpeed: DeepSpeed's rank 0 writes it before the final
barrier of ``save_checkpoint``, so with a slow rank (a shared filesystem under load) ``latest`` could name a
folder whose other ranks' files were still being written, and a kill then left a checkpoint that does not
load. Here it moves only after every rank has returned from the save, and atomically: a temporary file, fsync,
rename, fsync of the folder, so a crash leaves either the old name or the new one, never half of it.

Each step folder also holds ``fastclip.json`` (:data:`META`): the step, world size, ZeRO stage, precision, model and
every parameter's shape. A resume reads it before DeepSpeed does: a checkpoint of another model is refused naming
the parameters that differ, and one saved on another number of ranks or ZeRO stage is converted once to
DeepSpeed's universal format (``checkpoint.dir/universal/step_XXXXXXXX``, DeepSpeed's ds_to_universal) and
loaded from there. ``python -m fastclip.export`` (fastclip/export.py) reads the same folders without a run.

Why one module: save and resume are one protocol across ranks (barriers, ``latest``, the room each save
needs and what a failed one leaves); the file formats live below it (fastclip/open_clip_file.py, the run folders in
fastclip/run_folders.py, the universal conversion in fastclip/reshard.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastclip import reshard, run_folders
from fastclip.config import CheckpointConfig, Config
from fastclip.config_tree import differences
from fastclip.console import log, say
from fastclip.data.shard_specs import shard_list_digest
from fastclip.distributed import any_rank
from fastclip.errors import CheckpointError, ConfigError, TrainingDiverged
from fastclip.eval import EarlyStopping
from fastclip.model import param_group_names, regroup_flags, saved_layout
from fastclip.open_clip_file import how_to_load, write_export
from fastclip.run_folders import human
from fastclip.world import World, from_rank0

LATEST = "latest"
META = "fastclip.json"


@dataclass
class TrainState:
    """What the loop adds to the engine's state: saved with every checkpoint, restored on resume."""

    early_stopping: EarlyStopping = field(default_factory=lambda: EarlyStopping(patience=0))
    step: int = 0
    samples_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "early_stopping": self.early_stopping.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        if "early_stopping" in state:  # this run's patience and min delta, the saved count
            self.early_stopping.load_state_dict(state["early_stopping"])


@dataclass(frozen=True)
class Resumed:
    folder: Path
    saved_config: dict[str, Any]  # the run config the checkpoint was written with


def read_latest(root: str | Path) -> str | None:
    """The tag ``latest`` names in ``root``, or None when there is no checkpoint yet."""
    path = Path(root) / LATEST
    return path.read_text().strip() if path.is_file() else None


def locate(root: Path, where: str, world: World) -> Path | None:
    """The folder ``checkpoint.resume`` names ('auto', 'latest' or a step folder); None when 'auto' finds none.
    'latest' is rank 0's reading on every rank: a shared filesystem may show a new 'latest' to some nodes
    before others (NFS caches what it looked up), and ranks that resume different steps, or some none, hang
    in the first collective."""
    if where not in ("auto", "latest"):
        return _step_folder(where)
    said = ""
    if world.is_main:
        try:
            folder = _latest_folder(root, where)
            said = "none" if folder is None else f"folder {folder}"
        except ConfigError as e:
            said = f"error {e}"
    kind, _, text = from_rank0(world, "checkpoint.resume", said).partition(" ")
    if kind == "error":
        raise ConfigError(text)
    return Path(text) if kind == "folder" else None


def _latest_folder(root: Path, where: str) -> Path | None:
    tag = read_latest(root)
    if tag is None and where == "latest":
        raise ConfigError(
            f"checkpoint.resume latest: {root} holds no checkpoint ('latest' file) to resume. Check "
            "--checkpoint.dir, or say --checkpoint.resume auto to start from step 0 when there is none"
        )
    return root / tag if tag else None


def _step_folder(where: str) -> Path:
    path = Path(where)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume: {where!r} is not a checkpoint folder (or say 'auto' or 'latest')")
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_latest(root: str | Path, tag: str) -> None:
    """Point ``latest`` at ``root/tag``; call on one rank, after a barrier that follows every rank's save.

    The tag folder's files are flushed first, so that ``latest`` never outlives the data it names after a power
    loss (on a network filesystem, closing a file already made it visible to every node; the fsync is then
    cheap)."""
    root = Path(root)
    folder = root / tag
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(folder)
    tmp = root / f".{LATEST}.tmp"
    with open(tmp, "w") as f:
        f.write(tag)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / LATEST)
    _fsync(root)


def data_identity(cfg: Config, world_size: int, *, shard_list: str | None = None) -> dict:
    """What a saved train-stream position is valid for: another value of any starts the stream afresh. The
    shard list's hash, not only its spec: a glob matching shards added since would replay other samples."""
    data = cfg.data
    return {"world_size": world_size, "train_shards": data.train_shards, "batch_size": data.batch_size,
            "resampled": data.resampled, "seed": cfg.train.seed, "train_num_samples": data.train_num_samples,
            "shard_list": shard_list or shard_list_digest(data.train_shards, field="data.train_shards")[1]}  # fmt: skip


def run_meta(cfg: Config, *, clip, module, world_size: int, stage: int, precision: str, loss_kind: str) -> dict:
    """What every checkpoint of this run records about itself (:data:`META`): a resume and the export read it."""
    shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in module.named_parameters()}
    return {"world_size": world_size, "zero_stage": stage, "precision": precision, "model": cfg.model.name,
            "force_image_size": cfg.model.force_image_size, "loss_kind": loss_kind, "params": shapes,
            "param_groups": param_group_names(clip, rule=cfg.optim.decay_rule,
                                              align=cfg.train.align_params)}  # fmt: skip


def changed_settings(saved: dict, current: dict) -> list[str]:
    """'section.field old -> new' for every config field that differs between a checkpoint's config and this
    run's (``checkpoint.resume`` left out: it is how a resume differs by definition)."""
    return differences(saved, current, skip=("checkpoint.resume",))


def _delete(folder: Path) -> None:
    """Remove a step folder; what could not be removed is said in one line (not one per file), and stays."""
    failed: list[str] = []

    def note(function, path, error) -> None:  # error: an exception (onexc, 3.12+) or exc_info (onerror)
        failed.append(f"{path}: {error[1] if isinstance(error, tuple) else error}")

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=note)
    else:
        shutil.rmtree(folder, onerror=note)
    if failed:
        log.warning("checkpoint.keep: %d files of %s could not be deleted (first: %s); they stay", len(failed), folder,
                    failed[0])  # fmt: skip


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / META)


def read_meta(folder: Path) -> dict[str, Any] | None:
    """A step folder's ``fastclip.json``; None for folders saved before it existed."""
    path = folder / META
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint.resume: {path} is unreadable ({e}); its save did not finish?") from e


def check_same_model(folder: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse a checkpoint of another architecture or loss kind, naming the parameters whose shapes differ."""
    kind, ours = saved.get("loss_kind", "clip"), current.get("loss_kind", "clip")  # folders before SigLIP: clip
    if kind != ours:
        raise ConfigError(
            f"checkpoint.resume: {folder} was trained with loss.kind {kind}; this run's loss is {ours} (loss.kind "
            f"auto follows the architecture). Resume with --loss.kind {kind}, or use another --checkpoint.dir."
        )
    old, new = saved.get("params", {}), current["params"]
    diffs = [f"{n} {old.get(n)} -> {new.get(n)}" for n in sorted(old.keys() | new.keys()) if old.get(n) != new.get(n)]
    if not diffs:
        return
    raise ConfigError(  # every rank finds it alike: said once, by rank 0
        f"checkpoint.resume: {folder} holds another model ({saved.get('model')!r}, {len(old)} tensors) than this run "
        f"builds ({current['model']!r}, {len(new)} tensors): {len(diffs)} differ, first {'; '.join(diffs[:4])}. "
        f"Resume with the checkpoint's --model.name (and --model.force_image_size), or use another --checkpoint.dir."
    )


def _unpartitioned_masters(optimizer) -> dict[int, torch.Tensor]:
    """bf16 ZeRO-0's fp32 masters by parameter (DeepSpeed's unfused optimizer keeps them beside its bf16 groups,
    where ``safe_get_full_fp32_param`` does not look); {} for other optimizers."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not low or not high or not isinstance(high[0], (list, tuple)):
        return {}
    return {id(p): m.detach() for ps, ms in zip(low, high) for p, m in zip(ps, ms)}


class CheckpointManager:
    """One run's checkpoint folder. Every rank calls :meth:`save`, :meth:`resume` and :meth:`export_open_clip`
    (each rank writes and reads its own files; the collectives are DeepSpeed's and the barriers here)."""

    def __init__(
        self, cfg: CheckpointConfig, *, engine, rank: int, world_size: int, data_identity: dict[str, Any],
        meta: dict[str, Any], store=None,
    ):  # fmt: skip
        self.cfg, self.engine, self.rank, self.world_size = cfg, engine, rank, world_size
        self.store = store  # the rendezvous store: rank 0's verdict on a universal conversion reaches the others
        self.newest: Path | None = None  # the checkpoint this run saved or resumed last (the watchdog names it)
        self.exported: Path | None = None  # where rank 0 wrote open_clip.pt
        self._save_bytes, self._measured = 0, False  # see save_bytes
        self.root = Path(cfg.dir)
        self.data_identity = data_identity  # what a saved data position is only valid for
        self.meta = meta  # what this run's checkpoints are (fastclip.json): model, shapes, world size, stage
        from deepspeed.checkpoint import constants as ds

        # DeepSpeed saves this attribute of the module with each checkpoint; its universal conversion requires it of
        # ZeRO-1/2 checkpoints ("the client creates this state"): a plain data-parallel model needs nothing more
        info = {ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        setattr(engine.module, ds.UNIVERSAL_CHECKPOINT_INFO, info)

    @property
    def latest(self) -> Path | None:
        tag = read_latest(self.root)
        return self.root / tag if tag else None

    # ------------------------------------------------------------------------------------------------ save

    @property
    def params(self) -> int:
        return sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())  # ZeRO-3: whole

    def save_bytes(self) -> int:
        """About what one checkpoint takes: measured once from a whole one (the resumed or this run's first),
        estimated before that; not walked at every save (thousands of files on a shared filesystem)."""
        if not self._measured:
            folder = self.newest or self.latest
            self._measured = folder is not None and folder.is_dir()
            self._save_bytes = run_folders.bytes_per_save(self.params, folder if self._measured else None)
        return self._save_bytes

    def check_room(self, *, export: bool) -> None:
        """Before the first step: room on every rank for one checkpoint (and the open_clip export), or refuse."""
        need = self.save_bytes() + (4 * self.params if export else 0)
        short = run_folders.short_of_room(self.root, need, "a checkpoint" + (" and open_clip.pt" if export else ""))
        if any_rank(torch.tensor(short is not None, device=self.engine.device)):
            raise CheckpointError(
                f"checkpoint.dir: {short or 'another rank has no room for a checkpoint'}: the run would train and "
                "then fail to save. Free space there, or point --checkpoint.dir at a folder with room."
            )

    def save(self, state: TrainState, *, position, config: dict[str, Any], final: bool = False) -> Path | None:
        """Write ``step_XXXXXXXX``: each rank's data position, then DeepSpeed's files; then move ``latest``. With no
        room on some rank, nothing is written: a warning, or at the end of the run a :class:`CheckpointError`."""
        tag = f"step_{state.step:08d}"
        if self.newest is not None and self.newest.resolve() == (self.root / tag).resolve():  # resumed, not trained
            return self.newest  # (a requeued job's end): on disk already, and deleting it first would risk it
        if not self._room_for(state.step, final=final):
            return None
        if self.rank == 0:  # a folder of this tag from an abandoned run (resumed from an older step) goes first
            for stale in (self.root / tag, self.root / reshard.UNIVERSAL / tag):
                if stale.is_dir():
                    _delete(stale)
        if dist.is_initialized():
            dist.barrier()
        try:
            self._write(self.root / tag, state, position=position, config=config)
        except (OSError, RuntimeError) as e:
            if not run_folders.write_failed(e):
                raise
            raise self._failed(self.root / tag, state.step, e) from None
        if dist.is_initialized():
            dist.barrier()  # every rank has written and closed its files: only now may 'latest' name them
        if self.rank == 0:
            commit_latest(self.root, tag)
            say(f"checkpoint: {self.root / tag}")
        self.newest = self.root / tag
        self.prune()
        return self.root / tag

    def _write(self, folder: Path, state: TrainState, *, position, config: dict[str, Any]) -> None:
        self._save_position(folder, position)
        if self.rank == 0:
            write_meta(folder, {**self.meta, "step": state.step})
        client = {**state.state_dict(), "config": config}
        self.engine.save_checkpoint(str(self.root), tag=folder.name, client_state=client, save_latest=False)

    def _room_for(self, step: int, *, final: bool) -> bool:
        """Whether every rank has room for this save (the ranks agree: a checkpoint is whole or not written)."""
        short = run_folders.short_of_room(self.root, self.save_bytes(), f"step {step}")
        if not any_rank(torch.tensor(short is not None, device=self.engine.device)):
            return True
        said = f"checkpoint: step {step} not saved: {short or 'another rank has no room for it'}; {self._latest_said()}"
        if final:
            kept = f"; the final weights are in {self.exported}" if self.exported else ""
            raise CheckpointError(f"{said}{kept}. Free space, then --checkpoint.resume latest")
        log.warning("%s. Training goes on; the next save tries again (free space, or keep fewer: --checkpoint.keep).",
                    said)  # fmt: skip
        return False

    def _latest_said(self) -> str:
        tag = read_latest(self.root)
        return f"latest still names {tag}" if tag else "there is no checkpoint of this run yet"

    def _failed(self, folder: Path, step: int, error: BaseException) -> CheckpointError:
        """A save that failed part-way (a full disk, an I/O error), said in one line; its folder removed where this
        rank is its only writer (other ranks may still be writing theirs into it: it is left, and named)."""
        said = " ".join(str(error).split())[:200]
        if self.world_size == 1 and folder.exists():
            _delete(folder)
            left = "The partial folder was removed"
        else:
            left = f"The partial folder, which latest does not name, can be deleted ({folder})"
        return CheckpointError(
            f"checkpoint: saving step {step} to {folder} failed ({type(error).__name__}: {said}); it needs about "
            f"{human(self.save_bytes())}, {human(run_folders.free_bytes(self.root))} free there now. {left}; "
            f"{self._latest_said()}: free space (or keep fewer, --checkpoint.keep), then --checkpoint.resume latest."
        )

    def prune(self) -> None:
        """Delete all but the newest ``checkpoint.keep`` step folders, never the one ``latest`` names."""
        if not self.cfg.keep:
            return
        if dist.is_initialized():
            dist.barrier()  # every rank has finished writing before rank 0 deletes anything
        if self.rank != 0:
            return
        latest = read_latest(self.root)
        steps = sorted(p for p in self.root.glob("step_*") if p.is_dir())  # step_XXXXXXXX sorts by step
        for old in steps[: -self.cfg.keep]:
            if old.name != latest:
                _delete(old)
                if (converted := self.root / reshard.UNIVERSAL / old.name).is_dir():
                    _delete(converted)

    def _position_path(self, folder: Path) -> Path:
        return folder / f"data_rank{self.rank:05d}.json"

    def _save_position(self, folder: Path, position) -> None:
        """This rank's train-stream position, in the checkpoint's folder (written before 'latest' moves)."""
        if position is None:
            return  # no train batch taken yet
        folder.mkdir(parents=True, exist_ok=True)
        tmp = self._position_path(folder).with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.data_identity, **position.state()}))
        tmp.replace(self._position_path(folder))

    # ---------------------------------------------------------------------------------------------- resume

    def resume(self, folder: Path, state: TrainState, *, loader, load_scheduler: bool, stage: int) -> Resumed:
        """Load the engine, ``state`` and this rank's data position (into ``loader``) from ``folder``."""
        saved_meta = read_meta(folder)
        if saved_meta is not None:
            check_same_model(folder, saved_meta, self.meta)
        source = self._source(folder, saved_meta, stage)
        saved = self._load_engine(source, folder, load_scheduler=load_scheduler, stage=stage)
        state.load_state_dict(saved)
        self._restore_position(folder, loader)
        self._continue_from(folder)
        self.newest = folder
        return Resumed(folder, saved.get("config", {}))

    def _continue_from(self, folder: Path) -> None:
        """Resumed from an older step of this folder than ``latest`` names: ``latest`` names it now, as the steps
        after it belong to the abandoned run (this run replaces their folders as it saves them; a crash meanwhile
        must not leave ``latest`` naming one half replaced)."""
        if self.rank != 0 or folder.resolve().parent != self.root.resolve() or read_latest(self.root) == folder.name:
            return
        commit_latest(self.root, folder.name)
        say(f"checkpoint: {self.root / LATEST} names {folder.name} now, the step this run goes on from")

    def _source(self, folder: Path, saved: dict | None, stage: int) -> Path:
        """The folder DeepSpeed loads: ``folder`` itself, or its universal conversion when this run's world size,
        ZeRO stage or optimizer parameter groups differ from the checkpoint's (fastclip/reshard.py)."""
        now = {**self.meta, "world_size": self.world_size, "zero_stage": stage}
        if saved is None:
            return folder
        regroup = regroup_flags(saved_layout(saved, self.engine.module), self.engine.module, self.meta)
        if not reshard.check_convertible(folder, saved, now, regroup=regroup):
            return folder
        if regroup is not None:
            say(f"checkpoint: {folder}'s optimizer holds other parameter groups than this run's (it resumes alike "
                f"with {regroup}): regrouped by parameter name; from here on, weight decay follows this run's "
                "optim.decay_rule")  # fmt: skip
        if (saved.get("world_size"), saved.get("zero_stage")) != (now["world_size"], now["zero_stage"]):
            say(f"checkpoint: {folder} was saved on {reshard.describe(saved)}; this run is {reshard.describe(now)}")
        target = reshard.universal_source(folder, self.root, rank=self.rank, store=self.store,
                                          key=f"fastclip/universal/{folder.resolve()}")  # fmt: skip
        self.engine._config.load_universal_checkpoint = True  # read at load time (DeepSpeed's engine and ZeRO)
        return target

    def _load_engine(self, source: Path, folder: Path, *, load_scheduler: bool, stage: int) -> dict[str, Any]:
        """DeepSpeed's load of ``source`` (``folder``, or its universal conversion); what fails is said in one line
        naming the folder."""
        if not folder.is_dir():
            raise CheckpointError(
                f"checkpoint.resume: {folder} does not exist (it is what {folder.parent}/latest names); resume "
                "from another step folder with --checkpoint.resume DIR/step_XXXXXXXX"
            )
        try:
            loaded, client = self.engine.load_checkpoint(
                str(source.parent), tag=source.name, load_lr_scheduler_states=load_scheduler
            )
        except Exception as e:  # DeepSpeed raises AssertionError, FileNotFoundError, its ZeRO errors, ...
            said = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            if not said and e.__traceback__ is not None:  # a bare assert: where DeepSpeed asserted is what helps
                frame = traceback.extract_tb(e.__traceback__)[-1]
                said = f"at {'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno}: {frame.line}"
            raise CheckpointError(
                f"checkpoint.resume: {folder} does not load on this run ({self.world_size} ranks, ZeRO-{stage}): "
                f"{type(e).__name__}: {said}. A file missing from it means its save did not finish; resume from an "
                "older step folder with --checkpoint.resume DIR/step_XXXXXXXX."
            ) from e
        if loaded is None:
            raise CheckpointError(f"checkpoint.resume: DeepSpeed found no checkpoint in {folder}")
        return client

    def _restore_position(self, folder: Path, loader) -> None:
        path, why, differs = self._position_path(folder), None, None
        if not path.is_file():
            why = f"{path.name} is not in {folder}"
        else:
            saved = json.loads(path.read_text())
            changed = [k for k, v in self.data_identity.items() if saved.get(k) != v]
            if changed:
                why = f"{', '.join(changed)} changed since the checkpoint"
            else:
                try:
                    differs = loader.restore(saved)  # None where the stream goes on exactly
                except ValueError as e:  # saved by the other loader
                    why = str(e)
        if why is not None:
            say(f"data: the train stream starts afresh ({why})")
        else:
            how = f", inexactly: {differs}" if differs else ""
            say(f"data: the train stream goes on from the checkpoint's position{how}")

    # ---------------------------------------------------------------------------------------------- export

    def export_open_clip(
        self, *, step: int, model_name: str, fallback: Path | None = None, force_image_size: int | None = None
    ) -> Path | None:
        """fp32 weights as ``{'state_dict': ...}``, which ``open_clip.create_model(pretrained=path)`` loads (the log
        line gives the exact call); refused (:class:`TrainingDiverged`) when a weight is not finite. Where
        checkpoint.dir cannot take them (a full disk), into ``fallback`` (log.dir): the end of a run keeps its weights
        if any folder has room."""

        state = self._full_state()
        bad = next((name for name, value in state.items() if not torch.isfinite(value).all()), None)
        if bad is not None:  # every rank holds the whole state here, so every rank stops alike
            latest = self.latest or "none yet"
            raise TrainingDiverged(
                f"the weights hold non-finite values ({bad}) at step {step}: open_clip.pt was not written, and "
                f"nothing was saved; the newest checkpoint ({latest}) is untouched. Check --model.pretrained and the "
                "data, or resume from it with a lower --optim.lr."
            )
        if self.rank != 0:
            return None
        path = write_export([self.root, *([fallback] if fallback else [])], state, step=step, model=model_name)
        self.exported = path
        say(how_to_load(path, state, model=model_name, force_image_size=force_image_size))
        return path

    def _full_state(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        module, state = self.engine.module, {}
        masters = _unpartitioned_masters(self.engine.optimizer)
        for name, param in module.named_parameters():
            full = safe_get_full_fp32_param(param)  # collective under ZeRO-3: every rank takes part
            full = masters.get(id(param)) if full is None else full
            state[name] = (full if full is not None else param.detach()).float().cpu()
        persistent = module.state_dict().keys()  # leaves out non-persistent buffers (attn_mask)
        for name, buf in module.named_buffers():
            if name in persistent:
                state[name] = buf.detach().cpu()
        return state
