"""The training loop: build (model, data, steps, engine), then step, log, evaluate, checkpoint.

A step reads top to bottom: fetch batch, forward, loss, backward, optimizer step, meters. Only logging,
eval and checkpoint steps copy numbers to the host; every such place is marked ``note: host sync``. What a
checkpoint holds and how it is written and resumed is fastclip/checkpoint.py's; the DeepSpeed settings are
fastclip/engine.py's, read back from the engine; what stops a diverged run is fastclip/guard.py's. It runs past
300 lines: its short methods share the run's state (engine, loaders, meters, step), and splitting them further
would pass that state around rather than simplify it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.optim.lr_scheduler import LambdaLR

from fastclip import console, precision
from fastclip.accumulation import ContrastiveAccumulation, is_out_of_memory
from fastclip.checkpoint import CheckpointManager, TrainState, changed_settings
from fastclip.compile import compile_fn
from fastclip.config import LOGITS_BACKENDS, Config, check_compile
from fastclip.console import say
from fastclip.data.batch import Batch, BatchCount, DataPosition
from fastclip.data.build import build_loaders, with_threads
from fastclip.data.shards import shard_list_digest
from fastclip.data.tokenizer import build_tokenizer
from fastclip.engine import apply_adamw_settings, build_engine
from fastclip.errors import ConfigError, OutOfMemory
from fastclip.eval import EarlyStopping, evaluate, read_zeroshot_list
from fastclip.guard import NonFiniteGuard
from fastclip.loss import build_loss
from fastclip.meters import Meters
from fastclip.mfu import peak_flops, peak_memory_gb, train_flops_per_sample
from fastclip.model import build_model, image_spec, loss_kind, loss_scalars, param_group_names, param_groups
from fastclip.schedules import LrSchedule, cooldown_steps, epoch_source, restart_at, total_steps
from fastclip.sinks import MetricSinks, progress_bar, train_line
from fastclip.world import World


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


def due(step: int, every: int) -> bool:
    """A cadence of ``every`` steps (0: never)."""
    return every > 0 and step % every == 0


@dataclass
class Interval:
    """The steps since the last log line: how many, since when, and the host time spent waiting for data."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    steps: int = 0
    data_time: float = 0.0

    def add(self, data_time: float) -> None:
        self.steps, self.data_time = self.steps + 1, self.data_time + data_time


class Trainer:
    def __init__(self, cfg: Config, world: World):
        console.setup(world.rank)
        cfg = self.cfg = dataclasses.replace(cfg, data=with_threads(cfg.data, world.cpu_sharers))
        self.world = world
        seed_everything(cfg.train.seed)
        configure_matmuls(world.device, tf32=cfg.train.tf32)
        self.loss_kind = loss_kind(cfg.loss, cfg.model.name)  # 'clip' or 'siglip'
        self.clip = build_model(cfg.model, siglip=self.loss_kind == "siglip")
        self.image = image_spec(self.clip)
        self.tokenizer = build_tokenizer(cfg.model.name)
        self.train_loader, self.val_loader = build_loaders(
            cfg, rank=world.rank, world_size=world.world_size, device=world.device, image=self.image,
            tokenizer=self.tokenizer,
        )  # fmt: skip
        self.classnames, self.templates = self._zeroshot_lists()
        self.total_steps, self.steps_per_epoch = total_steps(
            self.train_loader.samples_per_epoch, batch_size=cfg.data.batch_size, grad_accum=cfg.train.grad_accum,
            world_size=world.world_size, steps=cfg.train.steps, epochs=cfg.train.epochs,
            counted_from=epoch_source(self.train_loader.epoch_from),
        )  # fmt: skip
        self.global_batch = cfg.data.batch_size * cfg.train.grad_accum * world.world_size
        contrastive = cfg.train.grad_accum > 1 and cfg.train.accum_mode == "contrastive"
        self.contrastive_batch = self.global_batch if contrastive else cfg.data.batch_size * world.world_size
        self.engine, self.scheduler = self._build_engine()
        self.stage, self.precision = self.engine.zero_optimization_stage(), precision.of_engine(self.engine)
        self.dtype = precision.input_dtype(self.precision)
        self.loss_fn = build_loss(cfg.loss, rank=world.rank, world_size=world.world_size, kind=self.loss_kind)
        self.compiled_forward, self.compiled_step = self._compile(contrastive)
        self.accumulation = None
        if contrastive:
            self.accumulation = ContrastiveAccumulation(
                self.forward, self._autocast_loss, device=world.device, model=self.engine.module,
                keep_last_graph=cfg.loss.backend not in LOGITS_BACKENDS,  # those would hold the logits meanwhile
            )  # fmt: skip
        scalars = ["logit_scale", "logit_bias"] if self.loss_kind == "siglip" else ["logit_scale"]
        self.meters = Meters(["loss", *scalars, "grad_norm"], device=world.device)
        self.flops_per_sample = train_flops_per_sample(cfg.model)  # model FLOPs, for the logs' mfu
        self.peak_flops = peak_flops(world.device, cfg.train.peak_tflops)
        peak_memory_gb(world.device)  # the first log's peak counts from here, not from the engine's build
        self.sinks = MetricSinks(cfg.log, enabled=world.is_main, config=cfg)
        self.state = TrainState(EarlyStopping(cfg.eval.early_stop_patience, cfg.eval.early_stop_min_delta))
        self.checkpoints = CheckpointManager(
            cfg.checkpoint, engine=self.engine, rank=world.rank, world_size=world.world_size,
            data_identity=self._data_identity(), meta=self._checkpoint_meta(), store=world.store,
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

    def _data_identity(self) -> dict:
        """What a saved train-stream position is valid for: another value of any starts the stream afresh. The
        shard list's hash, not only its spec: a glob matching shards added since would replay other samples."""
        data = self.cfg.data
        return {"world_size": self.world.world_size, "train_shards": data.train_shards, "batch_size": data.batch_size,
                "resampled": data.resampled, "seed": self.cfg.train.seed, "train_num_samples": data.train_num_samples,
                "shard_list": shard_list_digest(data.train_shards, field="data.train_shards")[1]}  # fmt: skip

    def _checkpoint_meta(self) -> dict:
        """What every checkpoint of this run records about itself (fastclip.json): a resume and the export read it."""
        shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.engine.module.named_parameters()}
        return {"world_size": self.world.world_size, "zero_stage": self.stage, "precision": self.precision,
                "model": self.cfg.model.name, "force_image_size": self.cfg.model.force_image_size,
                "loss_kind": self.loss_kind, "params": shapes,
                "param_groups": param_group_names(self.clip, rule=self.cfg.optim.decay_rule,
                                                  align=self.cfg.train.align_params)}  # fmt: skip

    def _zeroshot_lists(self) -> tuple[list[str] | None, list[str] | None]:
        data = self.cfg.data
        if not (self.cfg.eval.zeroshot and data.zeroshot_classnames and data.zeroshot_templates):
            return None, None
        return (
            read_zeroshot_list(data.zeroshot_classnames, field="data.zeroshot_classnames"),
            read_zeroshot_list(data.zeroshot_templates, field="data.zeroshot_templates"),
        )

    @property
    def step(self) -> int:
        return self.state.step

    def _build_engine(self):
        optim = self.cfg.optim
        self.schedule = schedule = LrSchedule(
            kind=optim.schedule, warmup=optim.warmup_steps, total=self.total_steps, min_ratio=optim.min_lr_ratio,
            cycle=optim.restart_steps, mult=optim.restart_mult, decay=optim.restart_decay,
            cooldown=cooldown_steps(optim, self.cfg.train, total=self.total_steps,
                                    steps_per_epoch=self.steps_per_epoch),
            end_ratio=optim.cooldown_end_lr / optim.lr, power=optim.cooldown_power,
        )  # fmt: skip
        engine, scheduler, ds_config = build_engine(
            self.clip, cfg=self.cfg, world_size=self.world.world_size, cuda=self.world.device.type == "cuda",
            params=param_groups(self.clip, weight_decay=optim.weight_decay, rule=optim.decay_rule,
                                align=self.cfg.train.align_params),
            lr_scheduler=lambda opt: LambdaLR(opt, schedule),
        )  # fmt: skip
        self.ds_config, self.own_schedule = ds_config, "scheduler" not in ds_config
        if self.cfg.deepspeed_config:
            say(f"deepspeed: {self.cfg.deepspeed_config} merged over the derived config: {ds_config}")
        return engine, scheduler

    # ------------------------------------------------------------------------------------------ the step

    def fetch(self, batches: Iterator[Batch]) -> Batch:
        batch = next(batches)
        self.data_position = batch.position  # host-side bookkeeping, saved with checkpoints
        return batch

    def _compile(self, contrastive: bool):
        """(compiled towers, compiled forward + loss) for ``train.compile`` (fastclip/compile.py); loss_fn is
        compiled in place for a contrastive step's loss over its cached features."""
        mode, backend = self.cfg.train.compile, self.cfg.train.compile_backend
        check_compile(mode, stage=self.stage)
        if mode == "none":
            return None, None
        # the module's forward, not its call: DeepSpeed's forward hooks (timers, ZeRO-3's parameter discovery: no work
        # at ZeRO-1/2) read the engine's step counters, which a graph would guard on and recompile for every step
        forward = self.engine.module.forward
        towers = compile_fn(forward, backend=backend) if mode == "model" or contrastive else None
        if mode == "step" and contrastive:
            self.loss_fn = compile_fn(self.loss_fn, backend=backend)
        step = compile_fn(self._module_and_loss, backend=backend) if mode == "step" and not contrastive else None
        return towers, step

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

    @property
    def val_loss_key(self) -> str:
        """The val loss early stopping watches: the run's own loss on the val set."""
        return f"val/{self.loss_kind}_loss"

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
            with self._memory_said():
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
        with self._memory_said():
            cache = self.accumulation.cache(micro)
            for surrogate in self.accumulation.backward_passes(cache, micro):
                self.engine.backward(surrogate, scale_wrt_gas=False)  # the loss is already the whole batch's mean
                self.optimizer_step()
        self.update_meters(cache.loss, cache.scalars)
        return data_time

    @contextlib.contextmanager
    def _memory_said(self):
        """An out-of-memory error as one line naming the batch that did not fit and what to lower."""
        try:
            yield
        except Exception as e:
            if not is_out_of_memory(e):
                raise
            raise OutOfMemory(self._out_of_memory(e)) from e

    def _logits_hint(self) -> str:
        if self.cfg.loss.backend in LOGITS_BACKENDS:
            return f"; loss.backend {self.cfg.loss.backend} holds the N x N logits, loss.backend auto does not"
        return ""

    def _held(self, batch: Batch) -> Batch:
        return dataclasses.replace(batch, images=batch.images.to(self.dtype))

    def _out_of_memory(self, error: Exception) -> str:
        micro, k = self.cfg.data.batch_size, self.cfg.train.grad_accum
        first = " ".join(str(error).split())[:200]
        if self.accumulation:
            return (
                f"out of memory in a step with a contrastive batch of {self.contrastive_batch} ({k} micro batches "
                f"of {micro} per rank x {self.world.world_size} ranks): lower data.batch_size (the activations of "
                f"one micro batch) or train.grad_accum (the inputs held for the replay)"
                f"{self._logits_hint()}. ({first})"
            )
        return (
            f"out of memory in a step with a micro batch of {micro} per rank: lower data.batch_size; "
            f"train.grad_accum keeps the step's batch with smaller micro batches{self._logits_hint()}. ({first})"
        )

    # ---------------------------------------------------------------------------------------- the loop

    def should_log(self) -> bool:
        return due(self.step, self.cfg.log.every) or self.step == self.total_steps

    def should_evaluate(self) -> bool:
        return due(self.step, self.cfg.eval.every) and self.step < self.total_steps  # the end evaluates anyway

    def should_checkpoint(self) -> bool:
        return due(self.step, self.cfg.checkpoint.every) and self.step < self.total_steps  # the end saves anyway

    def train(self) -> dict[str, float]:
        """Train to ``total_steps`` (or an early stop), then evaluate, save and export; the last eval's metrics."""
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
                if self.should_evaluate():
                    metrics = self.evaluate()
                    if self.state.early_stopping.update(metrics.get(self.val_loss_key), self.step):
                        if interval.steps:  # the steps since the last log line
                            self.log_train(interval, bar)
                        self._stop_early()
                        break
                    metrics = None  # a later step ends the run: the end evaluates again
                if self.should_checkpoint():
                    self.save()
            metrics = self.evaluate() if metrics is None else metrics
            self.save(final=True)
        finally:
            if bar is not None:
                bar.close()
        return metrics

    def _stop_early(self) -> None:
        stop = self.state.early_stopping
        record = {"step": self.step, "early_stop": True, f"val/best_{self.loss_kind}_loss": stop.best}
        record["val/best_step"] = stop.best_step
        self.sinks.write(
            record,
            console=(
                f"early stop at step {self.step}: val {self.loss_kind} loss has not improved on {stop.best:.4f} (step "
                f"{stop.best_step}) by more than {stop.min_delta} in {stop.patience} evaluations"
            ),
        )

    def _announce(self) -> None:
        n_params = sum(getattr(p, "ds_numel", p.numel()) for p in self.clip.parameters())  # ZeRO-3: partitioned
        say(
            f"fastclip: {self.cfg.model.name} ({n_params / 1e6:.1f}M params), {self.precision}, ZeRO-{self.stage}, "
            f"world: {self.world.layout()}; global batch {self.global_batch}, "
            f"{self.total_steps} steps ({self.steps_per_epoch}/epoch, {self.train_loader.samples_per_epoch} "
            f"samples/epoch from {self.train_loader.epoch_from}); {self._loss_line()}; {self._accumulation_line()}"
        )

    def _loss_line(self) -> str:
        """Which loss and which of the loss options are in effect (the other kind's are ignored)."""
        loss = self.cfg.loss
        if self.loss_kind == "siglip":
            return f"loss siglip (texts to every rank by '{loss.siglip_dist_impl}'; backend {loss.backend})"
        options = f"local_loss {loss.local_loss}, gather_with_grad {loss.gather_with_grad}"
        return f"loss clip ({options}; backend {loss.backend})"

    def _accumulation_line(self) -> str:
        k, micro, ranks = self.cfg.train.grad_accum, self.cfg.data.batch_size, self.world.world_size
        if k == 1:
            return f"contrastive batch {self.contrastive_batch} ({micro} per rank)"
        if self.accumulation:
            return (
                f"contrastive batch {self.contrastive_batch}: accumulation 'contrastive', one loss over {k} micro "
                f"batches of {micro} per rank ({self._replayed(k)} forwarded twice)"
            )
        return (
            f"contrastive batch {self.contrastive_batch}: accumulation 'independent', {k} micro batches of {micro} "
            f"per rank, each its own loss over {micro * ranks} samples"
        )

    def _replayed(self, k: int) -> str:
        if self.accumulation.keep_last_graph:  # the last keeps its graph from the first pass
            return "the first one" if k == 2 else f"the first {k - 1}"
        return "each"

    def log_train(self, interval: Interval, bar) -> Interval:
        """One log line for ``interval``'s steps; returns the next interval."""
        means = self.meters.collect()  # note: the host sync of a logging step (one all-reduce, one copy)
        elapsed, steps = time.perf_counter() - interval.start, interval.steps
        samples_per_second = steps * self.global_batch / elapsed
        record = {
            "step": self.step,
            "epoch": round(self.step / self.steps_per_epoch, 4),
            "samples_seen": self.state.samples_seen,
            "loss": means["loss"],
            "lr": float(self.lr),
            "logit_scale": means["logit_scale"],
            **({"logit_bias": means["logit_bias"]} if "logit_bias" in means else {}),
            "samples_per_second": samples_per_second,
            "samples_per_second_per_gpu": samples_per_second / self.world.world_size,
            "data_time": interval.data_time / steps,
            "batch_time": elapsed / steps,
            "mfu": (samples_per_second / self.world.world_size * self.flops_per_sample / self.peak_flops
                    if self.peak_flops else None),
            "peak_memory_gb": peak_memory_gb(self.world.device),  # since the last log line; null on a CPU
        }  # fmt: skip
        if self.grad_norms_seen:
            record["grad_norm"] = means["grad_norm"]  # pre-clip global norm, mean over the interval's steps
        if self.cfg.optim.skip_nonfinite:
            record["skipped_steps"] = self.engine.skipped_steps
        if bar is not None:
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{samples_per_second:.0f}", refresh=False)
        self.sinks.write(record, console=train_line(record, total_steps=self.total_steps))
        self.guard.check_logged(self.step, record["loss"], record.get("grad_norm"))
        return Interval()

    # -------------------------------------------------------------------------------- eval, checkpoints

    def _full_params(self):
        """Under ZeRO-3 the module's parameters are partitioned; gather them for whole-model work."""
        if self.stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None)
        return nullcontext()

    def evaluate(self) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        start = time.perf_counter()
        with self._full_params(), self.autocast():
            metrics = evaluate(
                self.engine.module, self.val_loader, tokenizer=self.tokenizer, classnames=self.classnames,
                templates=self.templates, device=self.world.device, dtype=self.dtype, loss_kind=self.loss_kind,
            )  # fmt: skip
        metrics["val/time"] = time.perf_counter() - start
        record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4), **metrics}
        parts = [f"{k[4:]} {v:.4f}" for k, v in metrics.items() if k not in ("val/samples", "val/time")]
        self.sinks.write(
            record, console=f"eval step {self.step} ({int(metrics['val/samples'])} samples): " + " | ".join(parts)
        )
        self.engine.train()
        return metrics

    def save(self, *, final: bool = False) -> None:
        """A checkpoint of this step, unless the steps since the last log (or, when steps are skipped, the weights)
        are not finite. At the end, open_clip.pt first: a last save that fails (a full disk) leaves the weights."""
        pending = torch.stack([self.meters["loss"].total, self.meters["grad_norm"].total])
        self.guard.check_before_save(self.step, pending, self.engine.module)
        if final and self.cfg.checkpoint.export_open_clip:
            model, fallback = self.cfg.model, Path(self.cfg.log.dir)
            self.checkpoints.export_open_clip(step=self.step, model_name=model.name, fallback=fallback,
                                              force_image_size=model.force_image_size)  # fmt: skip
        self.checkpoints.save(self.state, position=self.data_position, config=self.cfg.to_dict(), final=final)

    def resume(self, where: str) -> None:
        folder = self.checkpoints.locate(where)
        if folder is None:
            say(f"checkpoint.resume=latest: no checkpoint in {self.cfg.checkpoint.dir} yet, starting from step 0")
            return
        resumed = self.checkpoints.resume(
            folder, self.state, loader=self.train_loader, load_scheduler=not self.own_schedule, stage=self.stage
        )
        self.guard.skipped_before = self.engine.skipped_steps
        changed = changed_settings(resumed.saved_config, self.cfg.to_dict())
        if self.own_schedule:
            self._restart_schedule(where)
        changes = f"; changed since the checkpoint: {'; '.join(changed)}" if changed else ""
        # a record in metrics.jsonl too: the steps after it may repeat ones logged before a kill
        self.sinks.write(
            {"step": self.step, "resumed_from": str(folder), "changed": changed},
            console=f"resumed from {folder} at step {self.step}{changes}",
        )

    def _restart_schedule(self, where: str) -> None:
        """The learning rate at the restored step from this run's config (lr, schedule, steps), and its AdamW
        settings; the optimizer's moments stay the checkpoint's. Every schedule gives a positive lr before its last
        step, so the one resume that cannot learn is one with no step left: refused."""
        if self.step >= self.total_steps:
            raise ConfigError(
                f"checkpoint.resume: {where!r} is at step {self.step} and this run ends at step {self.total_steps} "
                "(train.steps, or train.epochs): nothing is left to train. Raise --train.steps to train further."
            )
        restart_at(self.scheduler, self.schedule, base_lr=self.cfg.optim.lr, step=self.step)
        apply_adamw_settings(self.engine.optimizer.param_groups, self.cfg.optim)

    def close(self) -> None:
        try:
            self.train_loader.close()
            if self.val_loader is not None:
                self.val_loader.close()
            self.sinks.close()
        finally:
            self._release_engine()

    def _release_engine(self) -> None:
        """ZeRO's gradient hooks live on autograd nodes, which Python's collector cannot see through: without their
        removal the engine, its parameters and optimizer state outlive the trainer (a second trainer in the same
        process, a sweep or a benchmark's batch probe, would run beside a dead one's memory)."""
        try:
            self.engine.destroy()  # it synchronizes the device
        except Exception as e:  # a device that already failed (a sticky CUDA error): the error to see came first
            say(f"fastclip: the DeepSpeed engine was not released cleanly ({type(e).__name__}: {e})")
