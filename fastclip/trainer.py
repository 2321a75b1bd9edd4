"""The training loop: build (model, data, steps, engine), then step, log, evaluate, checkpoint.

A step reads top to bottom: fetch batch, forward, loss, backward, optimizer step, meters. Only logging,
eval and checkpoint steps copy numbers to the host; every such place is marked ``note: host sync``. What a
checkpoint holds and how it is written and resumed is fastclip/checkpoint.py's; the DeepSpeed settings are
fastclip/engine.py's, read back from the engine; what stops a diverged run is fastclip/guard.py's.

Why one module: its short methods share the run's state (engine, loaders, meters, step); the pieces that do not
(the start-up line, out-of-memory messages, compile wiring, checkpoint metadata) live with their owners, and
splitting the loop further would pass that state around rather than simplify it.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from fastclip import console, precision
from fastclip.accumulation import ContrastiveAccumulation
from fastclip.banner import start_line
from fastclip.checkpoint import CheckpointManager, TrainState, changed_settings, data_identity, locate, run_meta
from fastclip.compile import compile_parts
from fastclip.config import LOGITS_BACKENDS, Config, check_compile
from fastclip.console import say
from fastclip.data.batch import Batch, BatchCount, DataPosition
from fastclip.data.build import build_loaders, with_threads
from fastclip.data.tokenizer import build_tokenizer
from fastclip.engine import apply_adamw_settings, build_engine, full_params, release
from fastclip.eval import EarlyStopping, evaluate, zeroshot_lists
from fastclip.guard import NonFiniteGuard
from fastclip.loss import build_loss
from fastclip.meters import Interval, Meters, due
from fastclip.mfu import mfu, peak_flops, peak_memory_gb, train_flops_per_sample
from fastclip.model import build_model, image_spec, loss_kind, loss_scalars, param_groups
from fastclip.out_of_memory import said_in_one_line
from fastclip.preemption import Preempted, StopRequests
from fastclip.schedules import build_schedule, epoch_source, restart_at, total_steps
from fastclip.sinks import MetricSinks, eval_line, progress_bar, train_line
from fastclip.world import World


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    def __init__(self, cfg: Config, world: World, *, shard_list: str | None = None):
        """``shard_list``: the train shard list's hash where the caller has it (fastclip/train.py), else listed here."""
        console.setup(world.rank)
        cfg = self.cfg = dataclasses.replace(cfg, data=with_threads(cfg.data, world.cpu_sharers))
        self.world = world
        seed_everything(cfg.train.seed)
        precision.configure_matmuls(world.device, tf32=cfg.train.tf32)
        self.loss_kind = loss_kind(cfg.loss, cfg.model.name)  # 'clip' or 'siglip'
        self.clip = build_model(cfg.model, siglip=self.loss_kind == "siglip")
        self.image, self.tokenizer = image_spec(self.clip), build_tokenizer(cfg.model.name)
        self.train_loader, self.val_loader = build_loaders(
            cfg, rank=world.rank, world_size=world.world_size, device=world.device, image=self.image,
            tokenizer=self.tokenizer,
        )  # fmt: skip
        self.classnames, self.templates = zeroshot_lists(cfg.data, enabled=cfg.eval.zeroshot)
        self.total_steps, self.steps_per_epoch = total_steps(
            self.train_loader.samples_per_epoch, batch_size=cfg.data.batch_size, grad_accum=cfg.train.grad_accum,
            world_size=world.world_size, steps=cfg.train.steps, epochs=cfg.train.epochs,
            counted_from=epoch_source(self.train_loader.epoch_from),
        )  # fmt: skip
        self.global_batch = cfg.data.batch_size * cfg.train.grad_accum * world.world_size
        contrastive = cfg.train.grad_accum > 1 and cfg.train.accum_mode == "contrastive"
        self.contrastive_batch = self.global_batch if contrastive else cfg.data.batch_size * world.world_size
        self.schedule = build_schedule(
            cfg.optim, cfg.train, total=self.total_steps, steps_per_epoch=self.steps_per_epoch
        )
        self.engine, self.scheduler, self.ds_config = build_engine(
            self.clip, cfg=cfg, world_size=world.world_size, cuda=world.device.type == "cuda",
            params=param_groups(self.clip, weight_decay=cfg.optim.weight_decay, rule=cfg.optim.decay_rule,
                                align=cfg.train.align_params),
            lr_scheduler=lambda opt: LambdaLR(opt, self.schedule),
        )  # fmt: skip
        self.own_schedule = "scheduler" not in self.ds_config  # else a user's DeepSpeed file schedules the lr
        self.stage, self.precision = self.engine.zero_optimization_stage(), precision.of_engine(self.engine)
        self.dtype = precision.input_dtype(self.precision)
        self.loss_fn, self.compiled_forward, self.compiled_step, self.accumulation = self._step_parts(contrastive)
        scalars = ["logit_scale", "logit_bias"] if self.loss_kind == "siglip" else ["logit_scale"]
        self.meters = Meters(["loss", *scalars, "grad_norm"], device=world.device)
        self.flops_per_sample = train_flops_per_sample(cfg.model)  # model FLOPs, for the logs' mfu
        self.peak_flops = peak_flops(world.device, cfg.train.peak_tflops)
        peak_memory_gb(world.device)  # the first log's peak counts from here, not from the engine's build
        self.sinks = MetricSinks(cfg.log, enabled=world.is_main, config=cfg)
        self.state = TrainState(EarlyStopping(cfg.eval.early_stop_patience, cfg.eval.early_stop_min_delta))
        self.checkpoints = CheckpointManager(
            cfg.checkpoint, engine=self.engine, rank=world.rank, world_size=world.world_size,
            data_identity=data_identity(cfg, world.world_size, shard_list=shard_list), store=world.store,
            meta=run_meta(cfg, clip=self.clip, module=self.engine.module, world_size=world.world_size,
                          stage=self.stage, precision=self.precision, loss_kind=self.loss_kind),
        )  # fmt: skip
        self.grad_norms_seen, self.lr = False, 0.0
        self.guard = NonFiniteGuard(cfg.optim, latest=lambda: self.checkpoints.latest)
        self.data_position: DataPosition | BatchCount | None = None
        if cfg.checkpoint.resume:
            try:
                self.resume(cfg.checkpoint.resume)
            except BaseException:
                self.close()  # the caller never gets this trainer to close: stop the loaders' threads here
                raise

    def _step_parts(self, contrastive: bool):
        """(the loss function, the compiled towers and compiled step where ``train.compile`` asks, the contrastive
        accumulation or None)."""
        cfg, world = self.cfg, self.world
        loss_fn = build_loss(cfg.loss, rank=world.rank, world_size=world.world_size, kind=self.loss_kind)
        check_compile(cfg.train.compile, stage=self.stage)  # a DeepSpeed file may have set another stage
        towers, step, loss_fn = compile_parts(
            cfg.train.compile, cfg.train.compile_backend, forward=self.engine.module.forward, loss_fn=loss_fn,
            step_fn=self._module_and_loss, contrastive=contrastive,
        )  # fmt: skip
        if not contrastive:
            return loss_fn, towers, step, None
        accumulation = ContrastiveAccumulation(
            self.forward, self._autocast_loss, device=world.device, model=self.engine.module,
            keep_last_graph=cfg.loss.backend not in LOGITS_BACKENDS,  # those would hold the logits meanwhile
        )  # fmt: skip
        return loss_fn, towers, step, accumulation

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------------------------------------ the step

    def fetch(self, batches: Iterator[Batch]) -> Batch:
        batch = next(batches)
        self.data_position = batch.position  # host-side bookkeeping, saved with checkpoints
        return batch

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        images = batch.images.to(self.dtype)
        if self.compiled_forward is not None:
            with self.autocast():  # the compiled module's forward is not DeepSpeed's, which would enter it
                return self.compiled_forward(images, batch.texts)
        return self.engine(images, batch.texts)

    def forward_and_loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.compiled_step is not None:
            with self.autocast():
                return self.compiled_step(batch.images.to(self.dtype), batch.texts)
        with self.autocast():  # the loss too, as open_clip computes it (DeepSpeed's autocast ends with the forward)
            return self.compute_loss(self.forward(batch))

    def autocast(self):
        """amp_bf16's autocast around what DeepSpeed's forward does not cover (fastclip/precision.py)."""
        return precision.autocast(self.precision, self.world.device)

    def _autocast_loss(self, *args: torch.Tensor) -> torch.Tensor:
        """The loss of contrastive accumulation's cached features, under amp_bf16's autocast as open_clip's
        ``accum_freq`` computes it (and as :meth:`forward_and_loss` does)."""
        with self.autocast():
            return self.loss_fn(*args)

    def _module_and_loss(
        self, images: torch.Tensor, texts: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """What ``train.compile step`` compiles: the towers, the logit scale and the loss, one graph."""
        return self.compute_loss(self.engine.module.forward(images, texts))  # without DeepSpeed's hooks, as above

    def compute_loss(self, out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its scalar inputs (logit scale; and bias, for SigLIP), for the meters."""
        scalars = loss_scalars(out)
        return self.loss_fn(out["image_features"], out["text_features"], *scalars.values()), scalars

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def optimizer_step(self) -> None:
        self.lr = self.scheduler.get_last_lr()[0]  # the rate this update uses (a host float); logged
        self.engine.step()  # applies the update at the accumulation boundary, with clipping and the LR schedule

    def update_meters(self, loss: torch.Tensor, scalars: dict[str, torch.Tensor]) -> None:
        self.meters["loss"].update(loss)
        for name, value in scalars.items():
            self.meters[name].update(value)

    def update_grad_norm(self) -> None:
        """The pre-clip global grad norm of the step just taken (a device tensor under ZeRO-1/2/3)."""
        norm = self.engine.get_global_grad_norm()
        if norm is not None:  # None where DeepSpeed does not compute it (ZeRO-1/2 without clipping)
            self.meters["grad_norm"].update(norm)
            self.grad_norms_seen = True

    def train_step(self, batches: Iterator[Batch]) -> float:
        """One optimizer step over ``train.grad_accum`` micro batches; returns host seconds spent waiting for data."""
        data_time = self.contrastive_step(batches) if self.accumulation else self.independent_steps(batches)
        self.update_grad_norm()
        self.state.step += 1
        self.state.samples_seen += self.global_batch
        if self.guard.skipping:  # DeepSpeed's count is a host int then: its own check synchronized this step
            self.guard.after_step(self.step, self.engine.skipped_steps)
        return data_time

    def independent_steps(self, batches: Iterator[Batch]) -> float:
        """Each micro batch its own loss and backward (no accumulation, or ``train.accum_mode independent``)."""
        data_time = 0.0
        for _ in range(self.cfg.train.grad_accum):
            start = time.perf_counter()
            batch = self.fetch(batches)
            data_time += time.perf_counter() - start
            with self._oom_said():
                loss, scalars = self.forward_and_loss(batch)
                self.backward(loss)
                self.optimizer_step()  # the first allocates the optimizer's state
            self.update_meters(loss, scalars)
        return data_time

    def contrastive_step(self, batches: Iterator[Batch]) -> float:
        """One loss over every micro batch of the step (fastclip/accumulation.py), back-propagated micro batch by
        micro batch through the engine."""
        start, position = time.perf_counter(), self.data_position
        try:  # held until the replay, in the training dtype (each converted as it comes: never two copies of all)
            micro = [self._held(self.fetch(batches)) for _ in range(self.cfg.train.grad_accum)]
        except StopIteration:
            self.data_position = position  # the batches fetched so far were not trained on
            raise
        data_time = time.perf_counter() - start
        with self._oom_said():
            cache = self.accumulation.cache(micro)
            for surrogate in self.accumulation.backward_passes(cache, micro):
                self.engine.backward(surrogate, scale_wrt_gas=False)  # the loss is already the whole batch's mean
                self.optimizer_step()
        self.update_meters(cache.loss, cache.scalars)
        return data_time

    def _oom_said(self):
        return said_in_one_line(self.cfg, world_size=self.world.world_size, contrastive_batch=self.contrastive_batch,
                                contrastive=self.accumulation is not None)  # fmt: skip

    def _held(self, batch: Batch) -> Batch:
        return dataclasses.replace(batch, images=batch.images.to(self.dtype))

    # ---------------------------------------------------------------------------------------- the loop

    def should_log(self) -> bool:
        return due(self.step, self.cfg.log.every) or self.step == self.total_steps

    def should_evaluate(self) -> bool:
        return due(self.step, self.cfg.eval.every) and self.step < self.total_steps  # the end evaluates anyway

    def should_checkpoint(self) -> bool:
        return due(self.step, self.cfg.checkpoint.every) and self.step < self.total_steps  # the end saves anyway

    def train(self, stop: StopRequests | None = None) -> dict[str, float]:
        """Train to ``total_steps`` (or an early stop), then evaluate, save and export; the last eval's metrics.
        ``stop``: the signals' stop requests (fastclip/preemption.py); at the step the ranks agree on, one
        checkpoint and :class:`Preempted`."""
        self.checkpoints.check_room(export=self.cfg.checkpoint.export_open_clip)  # not after hours of training
        self.engine.train()
        batches = iter(self.train_loader)
        self._announce()
        bar = progress_bar(enabled=self.world.is_main and self.cfg.log.progress, total=self.total_steps, done=self.step)
        interval, metrics = Interval(), None
        try:
            while self.step < self.total_steps:
                interval.add(self.train_step(batches))
                if bar is not None:
                    bar.update(1)
                if self.should_log():
                    interval = self.log_train(interval, bar)
                if stop is not None and stop.stop_step(self.step, self.world.device) == self.step < self.total_steps:
                    self._preempt(stop, interval, bar)  # the last step finishes as any run's end does
                if self.should_evaluate():
                    metrics = self.evaluate()
                    if self.state.early_stopping.update(metrics.get(f"val/{self.loss_kind}_loss"), self.step):
                        if interval.steps:  # the steps since the last log line
                            interval = self.log_train(interval, bar)
                        self._stop_early()
                        break
                    metrics = None  # a later step ends the run: the end evaluates again
                if self.should_checkpoint():
                    self.save()
            # a signal in the last steps: the requeued job evaluates and exports (see resume); after an early stop
            # (metrics: its eval) the end goes on, as a requeued job would train on from a stop saved there
            if stop is not None and metrics is None and stop.asked(self.world.device):
                self._preempt(stop, interval, bar)
            metrics = self.evaluate() if metrics is None else metrics  # (a stop asked for now waits for both)
            self.save(final=True)
            if stop is not None:
                stop.saved(final=True)
        finally:
            if bar is not None:
                bar.close()
        return metrics

    def _preempt(self, stop: StopRequests, interval: Interval, bar) -> None:
        """Stop at the agreed step: its log line, one checkpoint (no eval: the grace is short), then out."""
        if interval.steps:
            self.log_train(interval, bar)
        folder = self.save()
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # rank 0 has moved 'latest': from here a second signal exits 75 on any rank
        stop.saved()
        raise Preempted(self.step, stop.cause, folder, latest=self.checkpoints.newest)

    def _stop_early(self) -> None:
        record, line = self.state.early_stopping.stop_record(self.step, self.loss_kind)
        self.sinks.write(record, console=line)

    def _announce(self) -> None:
        say(start_line(
            self.cfg, params=sum(getattr(p, "ds_numel", p.numel()) for p in self.clip.parameters()),  # ZeRO-3 too
            runs=self.precision, stage=self.stage, device=self.world.device.type.upper(), world=self.world.layout(),
            ranks=self.world.world_size, steps=(self.total_steps, self.steps_per_epoch),
            epoch=(self.train_loader.samples_per_epoch, self.train_loader.epoch_from),
            contrastive_batch=self.contrastive_batch, loss_kind=self.loss_kind,
            replay_last=None if self.accumulation is None else not self.accumulation.keep_last_graph,
        ))  # fmt: skip

    def log_train(self, interval: Interval, bar) -> Interval:
        """One log line for ``interval``'s steps; returns the next interval."""
        means = self.meters.collect()  # note: the host sync of a logging step (one all-reduce, one copy)
        rates = interval.rates(self.global_batch, self.world.world_size)
        record = {
            "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
            "samples_seen": self.state.samples_seen, "loss": means["loss"], "lr": float(self.lr),
            **{name: means[name] for name in ("logit_scale", "logit_bias") if name in means},
            **rates, "mfu": mfu(rates["samples_per_second_per_gpu"], self.flops_per_sample, self.peak_flops),
            "peak_memory_gb": peak_memory_gb(self.world.device),  # since the last log line; null on a CPU
        }  # fmt: skip
        if self.grad_norms_seen:
            record["grad_norm"] = means["grad_norm"]  # pre-clip global norm, mean over the interval's steps
        if self.cfg.optim.skip_nonfinite:
            record["skipped_steps"] = self.engine.skipped_steps
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{rates['samples_per_second']:.0f}", refresh=False)
        self.sinks.write(record, console=train_line(record, total_steps=self.total_steps))
        self.guard.check_logged(self.step, record["loss"], record.get("grad_norm"))
        return Interval()

    # -------------------------------------------------------------------------------- eval, checkpoints

    def evaluate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        start = time.perf_counter()
        with full_params(self.engine, self.stage), self.autocast():
            metrics = evaluate(
                self.engine.module, self.val_loader, tokenizer=self.tokenizer, classnames=self.classnames,
                templates=self.templates, device=self.world.device, dtype=self.dtype, loss_kind=self.loss_kind,
            )  # fmt: skip
        metrics["val/time"] = time.perf_counter() - start
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **metrics}
        self.sinks.write(record, console=eval_line(self.step, metrics))
        self.engine.train()
        return metrics

    def save(self, *, final: bool = False) -> Path | None:
        """A checkpoint of this step, unless the steps since the last log (or, when steps are skipped, the weights)
        are not finite. At the end, open_clip.pt first: a last save that fails (a full disk) leaves the weights."""
        pending = torch.stack([self.meters["loss"].total, self.meters["grad_norm"].total])
        self.guard.check_before_save(self.step, pending, self.engine.module)
        if final and self.cfg.checkpoint.export_open_clip:
            model, fallback = self.cfg.model, Path(self.cfg.log.dir)
            self.checkpoints.export_open_clip(step=self.step, model_name=model.name, fallback=fallback,
                                              force_image_size=model.force_image_size)  # fmt: skip
        return self.checkpoints.save(self.state, position=self.data_position, config=self.cfg.to_dict(), final=final)

    def resume(self, where: str) -> None:
        folder = locate(self.checkpoints.root, where, self.world)
        if folder is None:
            say(f"checkpoint.resume auto: no checkpoint in {self.cfg.checkpoint.dir} yet, starting from step 0")
            return
        resumed = self.checkpoints.resume(
            folder, self.state, loader=self.train_loader, load_scheduler=not self.own_schedule, stage=self.stage
        )
        self.guard.skipped_before = self.engine.skipped_steps
        changed = changed_settings(resumed.saved_config, self.cfg.to_dict())
        if self.step == self.total_steps and where == "auto":  # a job stopped at its end, requeued
            say(f"checkpoint.resume auto: {folder} is this run's last step; what is left is its end (eval, export)")
        elif self.own_schedule:
            self._restart_schedule(where)
        changes = f"; changed since the checkpoint: {'; '.join(changed)}" if changed else ""
        # a record in metrics.jsonl too: the steps after it may repeat ones logged before a kill
        self.sinks.write(
            {"step": self.step, "resumed_from": str(folder), "changed": changed},
            console=f"resumed from {folder} at step {self.step}{changes}",
        )

    def _restart_schedule(self, where: str) -> None:
        """The learning rate at the restored step from this run's config (fastclip/schedules.py), and its AdamW
        settings; the optimizer's moments stay the checkpoint's."""
        restart_at(self.scheduler, self.schedule, base_lr=self.cfg.optim.lr, step=self.step, where=where)
        apply_adamw_settings(self.engine.optimizer.param_groups, self.cfg.optim)

    def close(self) -> None:
        try:
            self.train_loader.close()
            if self.val_loader is not None:
                self.val_loader.close()
            self.sinks.close()
        finally:
            release(self.engine)
