"""The training loop: build (model, data, steps, engine), then step, log, evaluate, checkpoint.

A step reads top to bottom: fetch batch, forward, loss, backward, optimizer step, meters. Only logging,
eval and checkpoint steps copy numbers to the host; every such place is marked ``note: host sync``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from fastclip.checkpoint import CheckpointError, changed_settings, commit_latest, read_latest
from fastclip.config import Config, ConfigError, LossConfig, OptimConfig, deepspeed_config, total_steps
from fastclip.data.batch import Batch, BatchCount, DataPosition
from fastclip.data.loader import build_loader
from fastclip.data.tokenizer import build_tokenizer
from fastclip.distributed import World
from fastclip.eval import evaluate
from fastclip.loss import ClipLoss
from fastclip.meters import Meters
from fastclip.model import build_model, image_spec, logit_scale_of, open_clip_state_dict, param_groups
from fastclip.schedules import LrSchedule, restart_at
from fastclip.sinks import MetricSinks
from fastclip.zero import sync_free_clipping


@dataclass
class EarlyStopping:
    """Stop when the val clip loss has not improved by more than ``min_delta`` for ``patience`` evaluations."""

    patience: int  # 0: never stop early
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = 0
    evals_since_best: int = 0

    def update(self, val_loss: float | None, step: int) -> bool:
        """Record an evaluation; True when training should stop."""
        if not self.patience or val_loss is None:
            return False
        if val_loss < self.best - self.min_delta:
            self.best, self.best_step, self.evals_since_best = val_loss, step, 0
            return False
        self.evals_since_best += 1
        return self.evals_since_best >= self.patience


def apply_adamw_settings(groups: list[dict], optim: OptimConfig) -> None:
    """This run's betas, eps and weight decay on the optimizer's groups (a checkpoint's state restores its own)."""
    for group in groups:
        group["betas"], group["eps"] = tuple(optim.betas), optim.eps
        group["weight_decay"] = optim.weight_decay if group.get("name") == "decay" else 0.0  # see param_groups


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; raised at a logging or checkpoint step, before anything is saved."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_matmuls(device: torch.device, *, tf32: bool) -> None:
    """Faster fp32 matmuls on a GPU (what stays fp32 under bf16: the loss's reductions, eval, fp32 runs), and
    cuDNN's autotuner for the patch-embedding conv, whose shapes never change. CPU numerics are left alone."""
    if device.type != "cuda" or not tf32:
        return
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def _read_list(path: str | None) -> list[str] | None:
    return json.loads(Path(path).read_text()) if path else None


def build_loss(loss: LossConfig, world: World) -> torch.nn.Module:
    """fastclip's ClipLoss on the configured backend, or open_clip's own (``open_clip``) for comparisons."""
    kwargs = dict(
        local_loss=loss.local_loss, gather_with_grad=loss.gather_with_grad, rank=world.rank, world_size=world.world_size
    )
    if loss.backend == "open_clip":
        from open_clip.loss import ClipLoss as OpenClipLoss

        return OpenClipLoss(**kwargs)
    return ClipLoss(**kwargs, backend=loss.backend)


class Trainer:
    def __init__(self, cfg: Config, world: World):
        self.cfg, self.world = cfg, world
        self.dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        seed_everything(cfg.train.seed)
        configure_matmuls(world.device, tf32=cfg.train.tf32)
        self.clip = build_model(cfg.model)
        self.image = image_spec(self.clip)
        self.tokenizer = build_tokenizer(cfg.model.name)
        self.train_loader, self.val_loader = self._build_loaders()
        self.classnames = _read_list(cfg.data.zeroshot_classnames) if cfg.eval.zeroshot else None
        self.templates = _read_list(cfg.data.zeroshot_templates) if cfg.eval.zeroshot else None
        self.total_steps, self.steps_per_epoch = total_steps(
            cfg, samples_per_epoch=self.train_loader.samples_per_epoch, world_size=world.world_size
        )
        self.global_batch = cfg.data.batch_size * cfg.train.grad_accum * world.world_size
        self.engine, self.scheduler = self._build_engine()
        self.loss_fn = build_loss(cfg.loss, world)
        self.meters = Meters(["loss", "logit_scale", "grad_norm"], device=world.device)
        self.sinks = MetricSinks(cfg.log, enabled=world.is_main, config=cfg)
        self.step = 0
        self.samples_seen = 0
        self.grad_norms_seen = False
        self.lr = 0.0
        self.skipped_in_a_row, self._skipped_before = 0, 0  # optim.skip_nonfinite: DeepSpeed's skipped steps
        self.data_position: DataPosition | BatchCount | None = None
        self.early_stopping = EarlyStopping(cfg.eval.early_stop_patience, cfg.eval.early_stop_min_delta)
        if cfg.checkpoint.resume:
            try:
                self.resume(cfg.checkpoint.resume)
            except BaseException:
                self.close()  # the caller never gets this trainer to close: stop the loaders' threads here
                raise

    def _build_loaders(self):
        cfg, world = self.cfg, self.world
        common = dict(image=self.image, tokenizer=self.tokenizer, rank=world.rank, world_size=world.world_size)
        # the run's seed on every rank: the loaders split each epoch among ranks and draw per-rank seeds themselves
        train = build_loader(data=cfg.data, train=True, seed=cfg.train.seed, device=world.device, **common)
        if not cfg.data.val_shards:
            return train, None
        eval_data = dataclasses.replace(cfg.data, batch_size=cfg.eval.batch_size or cfg.data.batch_size)
        return train, build_loader(data=eval_data, train=False, seed=cfg.train.seed, device=world.device, **common)

    def _build_engine(self):
        import deepspeed

        cfg, world = self.cfg, self.world
        ds_config = deepspeed_config(cfg, world_size=world.world_size, cuda=world.device.type == "cuda")
        optim = cfg.optim
        self.schedule = schedule = LrSchedule(
            kind=optim.schedule, warmup=optim.warmup_steps, total=self.total_steps, min_ratio=optim.min_lr_ratio,
            cycle=optim.restart_steps, mult=optim.restart_mult, decay=optim.restart_decay,
        )  # fmt: skip
        self.own_schedule = "scheduler" not in ds_config
        engine, _, _, scheduler = deepspeed.initialize(
            model=self.clip,
            model_parameters=param_groups(self.clip, weight_decay=cfg.optim.weight_decay),
            config=ds_config,
            # a "scheduler" in a --deepspeed_config file wins: DeepSpeed would prefer this callable to it
            lr_scheduler=(lambda opt: LambdaLR(opt, schedule)) if self.own_schedule else None,
        )
        sync_free_clipping(engine.optimizer)
        return engine, scheduler

    # ------------------------------------------------------------------------------------------ the step

    def fetch(self, batches: Iterator[Batch]) -> Batch:
        batch = next(batches)
        self.data_position = batch.position  # host-side bookkeeping, saved with checkpoints
        return batch

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.engine(batch.images.to(self.dtype), batch.texts)

    def compute_loss(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scale = logit_scale_of(out)
        return self.loss_fn(out["image_features"], out["text_features"], scale), scale

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def optimizer_step(self) -> None:
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this update uses (a host float); logged
        self.engine.step()  # applies the update at the accumulation boundary, with clipping and the LR schedule

    def update_meters(self, loss: torch.Tensor, scale: torch.Tensor) -> None:
        self.meters["loss"].update(loss)
        self.meters["logit_scale"].update(scale)

    def update_grad_norm(self) -> None:
        """The pre-clip global grad norm of the step just taken (a device tensor under ZeRO-1/2/3)."""
        norm = self.engine.get_global_grad_norm()
        if norm is not None:  # None where DeepSpeed does not compute it (ZeRO-1/2 without clipping)
            self.meters["grad_norm"].update(norm)
            self.grad_norms_seen = True

    def train_step(self, batches: Iterator[Batch]) -> float:
        """One optimizer step over ``train.grad_accum`` micro batches; returns host seconds spent waiting for data."""
        data_time = 0.0
        for _ in range(self.cfg.train.grad_accum):
            start = time.perf_counter()
            batch = self.fetch(batches)
            data_time += time.perf_counter() - start
            out = self.forward(batch)
            loss, scale = self.compute_loss(out)
            self.backward(loss)
            self.optimizer_step()
            self.update_meters(loss, scale)
        self.update_grad_norm()
        self.step += 1
        self.samples_seen += self.global_batch
        if self.cfg.optim.skip_nonfinite:
            self.count_skipped_steps()
        return data_time

    def count_skipped_steps(self) -> None:
        """Stop when DeepSpeed has skipped ``optim.max_skipped_steps`` steps in a row: gradients that are never
        finite mean the model is not learning (a NaN in the weights or the data), and going on would only end
        in a checkpoint and an export of that state."""
        skipped = self.engine.skipped_steps  # a host int: DeepSpeed's own overflow check synchronized this step
        self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped > self._skipped_before else 0
        self._skipped_before = skipped
        limit = self.cfg.optim.max_skipped_steps
        if self.skipped_in_a_row >= limit:
            self._diverged(
                f"steps {self.step - limit + 1}-{self.step} were all skipped because their gradients were not finite "
                f"(optim.max_skipped_steps={limit}; {skipped} skipped in all)",
                skipping=False,
            )

    # ---------------------------------------------------------------------------------------- the loop

    def train(self) -> dict[str, float]:
        cfg = self.cfg
        self.engine.train()
        batches = iter(self.train_loader)
        self._announce()
        bar = self._progress_bar()
        interval_start, interval_steps, interval_data = time.perf_counter(), 0, 0.0
        metrics: dict[str, float] | None = None  # the last evaluation's, when training ends on one
        try:
            while self.step < self.total_steps:
                interval_data += self.train_step(batches)
                interval_steps += 1
                if bar is not None:
                    bar.update(1)
                last = self.step == self.total_steps
                if self.step % cfg.log.every == 0 or last:
                    self.log_train(time.perf_counter() - interval_start, interval_steps, interval_data, bar)
                    interval_start, interval_steps, interval_data = time.perf_counter(), 0, 0.0
                if cfg.eval.every and self.step % cfg.eval.every == 0 and not last:
                    metrics = self.evaluate()
                    if self.early_stopping.update(metrics.get("val/clip_loss"), self.step):
                        if interval_steps:  # the steps since the last log line
                            self.log_train(time.perf_counter() - interval_start, interval_steps, interval_data, bar)
                        self._stop_early()
                        break
                    metrics = None
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and not last:
                    self.save()
            if metrics is None:
                metrics = self.evaluate()
            self.save()
            if cfg.checkpoint.export_open_clip:
                self.export_open_clip()
        finally:
            if bar is not None:
                bar.close()
        return metrics

    def _stop_early(self) -> None:
        stop = self.early_stopping
        record = {"step": self.step, "early_stop": True, "val/best_clip_loss": stop.best}
        record["val/best_step"] = stop.best_step
        self.sinks.write(
            record,
            console=(
                f"early stop at step {self.step}: val clip loss has not improved on {stop.best:.4f} (step "
                f"{stop.best_step}) by more than {stop.min_delta} in {stop.patience} evaluations"
            ),
        )

    def _progress_bar(self):
        if not (self.world.is_main and self.cfg.log.progress and sys.stderr.isatty()):
            return None  # a log file gets the throughput lines, not carriage-return redraws
        from tqdm import tqdm

        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _announce(self) -> None:
        if not self.world.is_main:
            return
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.clip.parameters())  # ZeRO-3: partitioned
        print(
            f"fastclip: {self.cfg.model.name} ({n_params / 1e6:.1f}M params), {self.world.world_size} rank(s) on "
            f"{self.world.device.type}, {self.cfg.train.precision}, ZeRO-{self.cfg.train.zero_stage}, global batch "
            f"{self.global_batch}, {self.total_steps} steps ({self.steps_per_epoch}/epoch, "
            f"{self.train_loader.samples_per_epoch} samples/epoch)",
            flush=True,
        )

    def log_train(self, elapsed: float, steps: int, data_time: float, bar) -> None:
        means = self.meters.collect()  # note: the host sync of a logging step (one all-reduce, one copy)
        samples_per_second = steps * self.global_batch / elapsed
        record = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "samples_seen": self.samples_seen,
            "loss": means["loss"],
            "lr": float(self.lr),
            "logit_scale": means["logit_scale"],
            "samples_per_second": samples_per_second,
            "samples_per_second_per_gpu": samples_per_second / self.world.world_size,
            "data_time": data_time / steps,
            "batch_time": elapsed / steps,
        }
        if self.grad_norms_seen:
            record["grad_norm"] = means["grad_norm"]  # pre-clip global norm, mean over the interval's steps
        if self.cfg.optim.skip_nonfinite:
            record["skipped_steps"] = self.engine.skipped_steps
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{samples_per_second:.0f}", refresh=False)
        self.sinks.write(
            record,
            console=(
                f"step {self.step}/{self.total_steps} | epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | "
                f"lr {record['lr']:.3e} | logit_scale {record['logit_scale']:.2f} | "
                + (f"grad_norm {record['grad_norm']:.3f} | " if self.grad_norms_seen else "")
                + f"{samples_per_second:.1f} samples/s "
                f"({record['samples_per_second_per_gpu']:.1f}/GPU) | data {1e3 * record['data_time']:.1f} ms | "
                f"batch {1e3 * record['batch_time']:.1f} ms"
            ),
        )
        if not (math.isfinite(record["loss"]) and math.isfinite(record.get("grad_norm", 0.0))):
            self._diverged(f"mean loss {record['loss']}, mean grad norm {record.get('grad_norm')} since the last log")

    def _diverged(self, what: str, *, skipping: bool | None = None) -> None:
        """Stop on a non-finite loss or grad norm unless DeepSpeed skips such steps (optim.skip_nonfinite)."""
        if self.cfg.optim.skip_nonfinite if skipping is None else skipping:
            return
        latest = read_latest(self.cfg.checkpoint.dir)
        kept = str(Path(self.cfg.checkpoint.dir) / latest) if latest else "none yet"
        if self.cfg.optim.skip_nonfinite:  # skipping did not help: the NaN is in the weights or comes every step
            advice = "Check --model.pretrained and the data, or resume from it with a lower --optim.lr."
        else:
            advice = (
                "Resume from it with --checkpoint.resume latest and a lower --optim.lr (or more --optim.warmup_steps), "
                "or add --optim.skip_nonfinite true to skip steps whose gradients are not finite (DeepSpeed's check, "
                "one host sync per step)."
            )
        raise TrainingDiverged(
            f"training diverged at step {self.step}: {what}. The weights may hold inf/NaN now, so nothing was saved; "
            f"the newest checkpoint ({kept}) is untouched. {advice}"
        )

    # -------------------------------------------------------------------------------- eval, checkpoints

    def _full_params(self):
        """Under ZeRO-3 the module's parameters are partitioned; gather them for whole-model work."""
        if self.cfg.train.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return nullcontext()

    def evaluate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        start = time.perf_counter()
        with self._full_params():
            metrics = evaluate(
                self.engine.module,
                self.val_loader,
                tokenizer=self.tokenizer,
                classnames=self.classnames,
                templates=self.templates,
                device=self.world.device,
                dtype=self.dtype,
            )
        metrics["val/time"] = time.perf_counter() - start
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **metrics}
        parts = [f"{k[4:]} {v:.4f}" for k, v in metrics.items() if k not in ("val/samples", "val/time")]
        self.sinks.write(
            record, console=f"eval step {self.step} ({int(metrics['val/samples'])} samples): " + " | ".join(parts)
        )
        self.engine.train()
        return metrics

    def client_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "samples_seen": self.samples_seen,
            "early_stopping": dataclasses.asdict(self.early_stopping),
            "config": self.cfg.to_dict(),
        }

    def _any_rank(self, flag: torch.Tensor) -> bool:
        """True when ``flag`` (a 0-dim bool tensor) is true on any rank; every rank gets the same answer."""
        flag = flag.to(torch.float32)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())  # note: host sync, at checkpoint and export time only

    def _first_nonfinite_weight(self) -> str | None:
        """The name of a parameter holding inf/NaN on some rank (this rank's partition under ZeRO-3), else None."""
        named = list(self.engine.module.named_parameters())
        local = [getattr(p, "ds_tensor", p) for _, p in named]  # ZeRO-3: the module holds empty placeholders
        bad = torch.stack([~torch.isfinite(t).all() for t in local])
        if not self._any_rank(bad.any()):
            return None
        return next((name for (name, _), b in zip(named, bad.tolist()) if b), "a parameter on another rank")

    def save(self) -> None:
        """A DeepSpeed checkpoint in its own folder; 'latest' moves only after every rank's files are complete."""
        # the steps since the last log step must be finite, and under skip_nonfinite the weights too
        pending = torch.stack([self.meters["loss"].total, self.meters["grad_norm"].total])
        if self._any_rank((~torch.isfinite(pending)).any()):
            self._diverged("the loss or grad norm since the last log step is not finite")
        if self.cfg.optim.skip_nonfinite and (name := self._first_nonfinite_weight()):
            self._diverged(f"the weights hold non-finite values ({name})", skipping=False)
        root, tag = Path(self.cfg.checkpoint.dir), f"step_{self.step:08d}"
        self._save_data_position(root / tag)
        self.engine.save_checkpoint(str(root), tag=tag, client_state=self.client_state(), save_latest=False)
        if dist.is_initialized():
            dist.barrier()  # every rank has written and closed its files: only now may 'latest' name them
        if self.world.is_main:
            commit_latest(root, tag)
            print(f"checkpoint: {root / tag}", flush=True)
        self._prune_checkpoints()

    def _prune_checkpoints(self) -> None:
        """Delete all but the newest ``checkpoint.keep`` step folders, never the one 'latest' names."""
        keep, root = self.cfg.checkpoint.keep, Path(self.cfg.checkpoint.dir)
        if not keep:
            return
        if dist.is_initialized():
            dist.barrier()  # every rank has finished writing before rank 0 deletes anything
        if not self.world.is_main:
            return
        latest = read_latest(root)
        steps = sorted(p for p in root.glob("step_*") if p.is_dir())  # step_XXXXXXXX sorts by step
        for old in steps[:-keep]:
            if old.name != latest:
                shutil.rmtree(old, ignore_errors=True)

    def _data_state_path(self, folder: Path) -> Path:
        return folder / f"data_rank{self.world.rank:05d}.json"

    def _data_identity(self) -> dict[str, Any]:
        """What a saved data position is only valid for."""
        data = self.cfg.data
        return {"world_size": self.world.world_size, "train_shards": data.train_shards, "batch_size": data.batch_size}

    def _save_data_position(self, folder: Path) -> None:
        """Each rank's train-stream position, in the checkpoint's folder (written before 'latest' moves)."""
        if self.data_position is None:
            return  # no train batch taken yet
        folder.mkdir(parents=True, exist_ok=True)
        state = {**self._data_identity(), **self.data_position.state()}
        tmp = self._data_state_path(folder).with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self._data_state_path(folder))

    def _restore_data_position(self, folder: Path) -> None:
        path, why = self._data_state_path(folder), None
        if not path.is_file():
            why = f"{path.name} is not in {folder}"
        else:
            state = json.loads(path.read_text())
            changed = [k for k, v in self._data_identity().items() if state.get(k) != v]
            if changed:
                why = f"{', '.join(changed)} changed since the checkpoint"
            else:
                try:
                    self.train_loader.restore(state)
                except ValueError as e:  # saved by the other loader
                    why = str(e)
        if self.world.is_main:
            print(
                "data: the train stream goes on from the checkpoint's position"
                if why is None
                else f"data: the train stream starts afresh ({why})",
                flush=True,
            )

    def resume(self, where: str) -> None:
        directory, tag = self.cfg.checkpoint.dir, None
        if where != "latest":
            path = Path(where)
            if not path.is_dir():
                raise ConfigError(f"checkpoint.resume: {where!r} is not a checkpoint folder (or say 'latest')")
            directory, tag = str(path.parent), path.name
        elif read_latest(directory) is None:
            if self.world.is_main:
                print(f"checkpoint.resume=latest: no checkpoint in {directory} yet, starting from step 0", flush=True)
            return
        tag = tag or read_latest(directory)
        loaded, state = self._load_engine(directory, tag)
        self.step, self.samples_seen = int(state["step"]), int(state["samples_seen"])
        self._skipped_before = self.engine.skipped_steps
        if "early_stopping" in state:  # the patience count goes on (with this run's patience and min delta)
            saved, stop = state["early_stopping"], self.early_stopping
            stop.best, stop.best_step = saved["best"], saved["best_step"]
            stop.evals_since_best = saved["evals_since_best"]
        changed = changed_settings(state.get("config", {}), self.cfg.to_dict())
        if self.own_schedule:
            self._restart_schedule(where)
        self._restore_data_position(Path(directory) / tag)
        changes = f"; changed since the checkpoint: {'; '.join(changed)}" if changed else ""
        # a record in metrics.jsonl too: the steps after it may repeat ones logged before a kill
        self.sinks.write(
            {"step": self.step, "resumed_from": str(Path(directory) / tag), "changed": changed},
            console=f"resumed from {loaded} at step {self.step}{changes}",
        )

    def _load_engine(self, directory: str, tag: str) -> tuple[str, dict]:
        """DeepSpeed's load of ``directory/tag``; what fails is said in one line naming the folder."""
        folder = Path(directory) / tag
        if not folder.is_dir():
            raise CheckpointError(
                f"checkpoint.resume: {folder} does not exist (it is what {directory}/latest names); resume from "
                "another step folder with --checkpoint.resume DIR/step_XXXXXXXX"
            )
        try:  # fastclip's schedule is rebuilt from this run's config; a DeepSpeed-config scheduler keeps its state
            loaded, state = self.engine.load_checkpoint(
                directory, tag=tag, load_lr_scheduler_states=not self.own_schedule
            )
        except Exception as e:  # DeepSpeed raises AssertionError, FileNotFoundError, its ZeRO errors, ...
            said = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            raise CheckpointError(
                f"checkpoint.resume: {folder} does not load on this run ({self.world.world_size} ranks, ZeRO-"
                f"{self.cfg.train.zero_stage}): {type(e).__name__}: {said}. A checkpoint resumes on the number of "
                "ranks and the ZeRO stage it was saved with; a file missing from it means its save did not finish."
            ) from e
        if loaded is None:
            raise CheckpointError(f"checkpoint.resume: DeepSpeed found no checkpoint in {folder}")
        return loaded, state

    def _restart_schedule(self, where: str) -> None:
        """The learning rate at the restored step from this run's config (lr, schedule, steps), and its AdamW
        settings; the optimizer's moments stay the checkpoint's. Every schedule gives a positive lr before its last
        step, so the one resume that cannot learn is one with no step left: refused."""
        remaining = range(self.step, self.total_steps)
        if not remaining:
            raise ConfigError(
                f"checkpoint.resume: {where!r} is at step {self.step} and this run ends at step {self.total_steps} "
                "(train.steps, or train.epochs): nothing is left to train. Raise --train.steps to train further."
            )
        restart_at(self.scheduler, self.schedule, base_lr=self.cfg.optim.lr, step=self.step)
        apply_adamw_settings(self.engine.optimizer.param_groups, self.cfg.optim)

    def export_open_clip(self) -> Path | None:
        """fp32 weights as ``{'state_dict': ...}``, which ``open_clip.create_model(pretrained=path)`` loads."""
        from deepspeed.utils import safe_get_full_fp32_param

        state = {}
        for name, param in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(param)  # collective under ZeRO-3: every rank takes part
            state[name] = (full if full is not None else param.detach()).float().cpu()
        persistent = self.engine.module.state_dict().keys()  # leaves out non-persistent buffers (attn_mask)
        for name, buf in self.engine.module.named_buffers():
            if name in persistent:
                state[name] = buf.detach().cpu()
        bad = next((name for name, value in state.items() if not torch.isfinite(value).all()), None)
        if bad is not None:  # every rank holds the whole state here, so every rank stops alike
            self._diverged(f"the weights hold non-finite values ({bad}); open_clip.pt was not written", skipping=False)
        if not self.world.is_main:
            return None
        path = Path(self.cfg.checkpoint.dir) / "open_clip.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save({"state_dict": open_clip_state_dict(state), "step": self.step, "model": self.cfg.model.name}, tmp)
        tmp.replace(path)
        print(f"open_clip weights: {path}", flush=True)
        return path

    def close(self) -> None:
        self.train_loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
        self.sinks.close()
