"""The run configuration: nested dataclasses, one per concern (built from a nested mapping by
fastclip/config_tree.py).

Every field is documented in one line beside it (``--help`` prints those lines: fastclip/cli.py). Checks here are
structural, in ``__post_init__``, with no I/O; what touches files runs in fastclip/preflight.py, and the
DeepSpeed settings derived from the config live with the engine (fastclip/engine.py).

Why one module: it is the schema --help prints, each field documented beside it and each section's checks beside
its fields; the registries the fields are checked against (loss backends, compile modes) live here too, so that a
config is checked without importing torch.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from fastclip.errors import ConfigError
from fastclip.schedules import SCHEDULES


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {message}")


@dataclass
class ModelConfig:
    name: str = "fastclip-tiny"  # open_clip architecture (see open_clip.list_models()) or a model-config JSON path
    pretrained: str | None = None  # local checkpoint file to start from (state_dict or {'state_dict': ...})
    force_image_size: int | None = None  # override the architecture's input resolution
    grad_checkpointing: bool = False  # recompute each block in the backward (open_clip's --grad-checkpointing)
    lock_image: bool = False  # freeze the image tower (LiT; open_clip's --lock-image): no gradients, no optimizer state
    lock_image_unlocked_groups: int = 0  # with lock_image: leave the last N layer groups trainable
    lock_image_freeze_bn_stats: bool = False  # with lock_image: also freeze BatchNorm running statistics (ResNets)
    lock_text: bool = False  # freeze the text tower (open_clip's --lock-text)
    lock_text_unlocked_layers: int = 0  # with lock_text: leave the last N layers trainable
    lock_text_freeze_layer_norm: bool = True  # with lock_text: its LayerNorms too (open_clip's text tower needs it)
    patch_dropout: float = 0.0  # image patches dropped in training, none at eval (FLIP; --force-patch-dropout)

    def __post_init__(self):
        _require(bool(self.name), "model.name", "must name an open_clip architecture or a model-config JSON file")
        _require(0 <= self.patch_dropout < 1, "model.patch_dropout", f"must be in [0, 1), got {self.patch_dropout}")
        for name in ("lock_image_unlocked_groups", "lock_text_unlocked_layers"):
            _require(getattr(self, name) >= 0, f"model.{name}", f"must be >= 0, got {getattr(self, name)}")
        _require(
            self.force_image_size is None or self.force_image_size > 0,
            "model.force_image_size",
            f"must be a positive number of pixels, got {self.force_image_size}",
        )


def _demo_dir() -> str:
    """FASTCLIP_DEMO_DIR, read when a config is made (a test suite or a shared machine points it elsewhere)."""
    return os.environ.get("FASTCLIP_DEMO_DIR", ".cache/fastclip-demo")


@dataclass
class DataConfig:
    train_shards: str | None = None  # webdataset tars: a glob, a brace range ({000..099}) or '::'-joined list
    val_shards: str | None = None  # same syntax; empty disables evaluation
    batch_size: int = 64  # samples per GPU (rank) per micro step
    zeroshot_classnames: str | None = None  # JSON list of class names; index = the sample's .cls
    zeroshot_templates: str | None = None  # JSON list of prompt templates with one '{}'
    demo_dir: str = field(default_factory=_demo_dir)  # with no train_shards: the synthetic world, generated once here
    # 0: the cores this rank may use (its CPU affinity) / the node's ranks sharing them, 1 to 16 (data/loader.py)
    num_threads: int = 0  # DALI threads (torch loader: DataLoader workers) per rank; 0: this rank's share of its cores
    shuffle_buffer: int = 1024  # samples in the shuffle buffer (per rank; per worker with the torch loader)
    loader: str = "auto"  # 'dali', 'torch' (DataLoader + torchvision) or 'auto' (DALI with a GPU, else torch)
    decode_device: str = "auto"  # 'auto' (GPU decode when CUDA exists), 'mixed' (nvJPEG) or 'cpu'
    crop_scale: tuple[float, float] = (0.9, 1.0)  # random-resized-crop area range, as open_clip's default
    max_bad_fraction: float = 0.01  # damaged shards (truncated, unreadable) skipped up to this fraction, else stop
    train_num_samples: int | None = None  # samples in an epoch (open_clip's --train-num-samples); none are counted
    resampled: bool = False  # draw train shards with replacement, per rank (open_clip's --dataset-resampled)
    index_dir: str | None = None  # folder of the index tool's files, when not beside the shards (read-only ones)
    check_shards: int = 64  # shards opened at start-up (the first, the last, evenly between); the rest when read
    remote_retries: int = 5  # retries of a failed read of a remote shard (s3://, http(s)://, pipe:), with backoff
    remote_timeout_s: float = 60.0  # a remote read that receives nothing for this long fails (and is retried)

    def __post_init__(self):
        _require(self.batch_size > 0, "data.batch_size", f"must be a positive integer, got {self.batch_size}")
        _require(self.num_threads >= 0, "data.num_threads", f"must be >= 0 (0: automatic), got {self.num_threads}")
        _require(self.shuffle_buffer > 0, "data.shuffle_buffer", f"must be positive, got {self.shuffle_buffer}")
        _require(
            self.loader in ("auto", "dali", "torch"), "data.loader", f"must be auto, dali or torch, got {self.loader!r}"
        )
        _require(
            self.decode_device in ("auto", "mixed", "cpu"),
            "data.decode_device",
            f"must be 'auto', 'mixed' or 'cpu', got {self.decode_device!r}",
        )
        bad = self.max_bad_fraction
        _require(0 <= bad < 1, "data.max_bad_fraction", f"must be in [0, 1) (0 stops on any damaged shard), got {bad}")
        n = self.train_num_samples
        _require(n is None or n > 0, "data.train_num_samples", f"must be a positive number of samples, got {n}")
        _require(
            n is not None or not self.resampled, "data.resampled",
            "draws shards with replacement, so an epoch has no natural end: set data.train_num_samples as well",
        )  # fmt: skip
        _require(self.check_shards > 0, "data.check_shards", f"must be positive, got {self.check_shards}")
        _require(self.remote_retries >= 0, "data.remote_retries", f"must be >= 0, got {self.remote_retries}")
        _require(self.remote_timeout_s > 0, "data.remote_timeout_s", f"must be positive, got {self.remote_timeout_s}")
        lo, hi = self.crop_scale
        _require(
            0 < lo <= hi <= 1, "data.crop_scale", f"must be [lo, hi] with 0 < lo <= hi <= 1, got {self.crop_scale}"
        )

    @property
    def demo(self) -> bool:
        """True when no shards were given: train on the generated synthetic world."""
        return not self.train_shards


# every backend loss.backend (and ClipLoss(backend=...)) accepts; the config validates against this registry
BACKENDS = {
    "auto": "the fused op: the C++ kernel on CPU tensors, the Triton kernel on CUDA tensors",
    "cpp": "the fused C++ kernel (CPU tensors)",
    "triton": "the fused Triton kernel (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)",
    "torch": "plain logits in torch: the N x N matrix exists (the reference)",
    "open_clip": "open_clip's own ClipLoss (for A/B runs; build_loss only)",
}
LOGITS_BACKENDS = ("torch", "open_clip")  # the backends whose loss holds the N x N logits
DIST_IMPLS = ("gather", "reduce", "shift", "bidir")  # open_clip's names; 'reduce' runs as 'gather' (same values)


@dataclass
class LossConfig:
    local_loss: bool = True  # each rank computes its rows against all columns (open_clip's --local-loss)
    gather_with_grad: bool = True  # all-gather features with gradient (open_clip's --gather-with-grad)
    backend: str = "auto"  # 'auto' (fused: C++ on CPU, Triton on CUDA), 'cpp', 'triton', 'torch', 'open_clip'
    kind: str = "auto"  # 'clip' (softmax), 'siglip' (sigmoid, with a logit bias) or 'auto' (siglip for SigLIP models)
    siglip_dist_impl: str = "gather"  # how texts reach the other ranks: 'gather', 'shift', 'bidir' (or 'reduce')

    def __post_init__(self):
        choices = ", ".join(BACKENDS)
        _require(self.backend in BACKENDS, "loss.backend", f"must be one of {choices}; got {self.backend!r}")
        kinds = ("auto", "clip", "siglip")
        _require(self.kind in kinds, "loss.kind", f"must be auto, clip or siglip; got {self.kind!r}")
        impls = ", ".join(DIST_IMPLS)
        _require(
            self.siglip_dist_impl in DIST_IMPLS,
            "loss.siglip_dist_impl",
            f"must be one of {impls}; got {self.siglip_dist_impl!r}",
        )


DECAY_RULES = ("open_clip", "no_embeddings")  # optim.decay_rule (fastclip/model.py's param_group_names)


@dataclass
class OptimConfig:
    lr: float = 1e-3  # peak learning rate after warmup
    weight_decay: float = 0.1  # AdamW decay, on the parameters optim.decay_rule names
    # 'open_clip': open_clip_train's rule (no decay on 1-d tensors and names with bn, ln, bias or logit_scale);
    # 'no_embeddings': that and the token and positional embeddings too (fastclip's rule before 2026-12)
    decay_rule: str = "open_clip"  # which parameters weight_decay applies to: 'open_clip' or 'no_embeddings'
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (open_clip's ViT defaults)
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 50  # linear warmup to lr, in optimizer steps
    schedule: str = "cosine"  # after warmup: 'cosine', 'cosine_restarts' (SGDR), 'constant' or 'const_cooldown'
    min_lr_ratio: float = 0.0  # cosine (and each restart cycle) decays to lr * min_lr_ratio
    restart_steps: int = 0  # cosine_restarts: steps in the first cycle; 0 means a quarter of the post-warmup steps
    restart_mult: float = 1.0  # cosine_restarts: each cycle this many times longer than the one before
    restart_decay: float = 1.0  # cosine_restarts: each cycle's peak lr this many times the one before
    cooldown_steps: int = 0  # const_cooldown: the last steps, decaying from lr (open_clip's --epochs-cooldown in steps)
    cooldown_epochs: float = 0.0  # const_cooldown: the cooldown in epochs, when cooldown_steps is 0
    cooldown_end_lr: float = 0.0  # const_cooldown: the lr at the last step (open_clip's --lr-cooldown-end)
    cooldown_power: float = 1.0  # const_cooldown: 1 decays linearly, 2 quadratically (open_clip's --lr-cooldown-power)
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    fused: bool = True  # torch's AdamW as one fused kernel a step (false: its foreach ops); see optim.fused_adam
    fused_adam: bool = False  # on CUDA, DeepSpeed's FusedAdam (JIT-compiled with nvcc) instead of torch's AdamW at all
    skip_nonfinite: bool = False  # skip steps whose grads hold inf/NaN (DeepSpeed's check: a host sync per step)
    max_skipped_steps: int = 10  # with skip_nonfinite: this many skipped steps in a row end the run (exit 1)

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        rules = ", ".join(f"'{k}'" for k in DECAY_RULES)
        _require(self.decay_rule in DECAY_RULES, "optim.decay_rule", f"must be {rules}; got {self.decay_rule!r}")
        _require(all(0 <= b < 1 for b in self.betas), "optim.betas", f"must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, "optim.eps", f"must be positive (AdamW divides by sqrt(v) + eps), got {self.eps}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        choices = ", ".join(SCHEDULES)
        _require(self.schedule in SCHEDULES, "optim.schedule", f"must be one of {choices}, got {self.schedule!r}")
        _require(self.restart_steps >= 0, "optim.restart_steps", f"must be >= 0, got {self.restart_steps}")
        _require(self.restart_mult >= 1, "optim.restart_mult", f"must be >= 1, got {self.restart_mult}")
        _require(0 < self.restart_decay <= 1, "optim.restart_decay", f"must be in (0, 1], got {self.restart_decay}")
        _require(self.cooldown_steps >= 0, "optim.cooldown_steps", f"must be >= 0, got {self.cooldown_steps}")
        _require(self.cooldown_epochs >= 0, "optim.cooldown_epochs", f"must be >= 0, got {self.cooldown_epochs}")
        end = self.cooldown_end_lr
        _require(0 <= end <= self.lr, "optim.cooldown_end_lr", f"must be in [0, optim.lr={self.lr}], got {end}")
        _require(self.cooldown_power > 0, "optim.cooldown_power", f"must be positive, got {self.cooldown_power}")
        if self.schedule == "const_cooldown":
            _require(self.cooldown_steps > 0 or self.cooldown_epochs > 0, "optim.cooldown_steps",
                     "const_cooldown needs a cooldown: set optim.cooldown_steps or optim.cooldown_epochs")  # fmt: skip
        _require(self.grad_clip >= 0, "optim.grad_clip", f"must be >= 0 (0 disables), got {self.grad_clip}")
        skips = self.max_skipped_steps
        _require(skips > 0, "optim.max_skipped_steps", f"must be a positive number of steps, got {skips}")


# train.accum_mode with grad_accum > 1 (fastclip/accumulation.py does the contrastive one)
ACCUM_MODES = {
    "contrastive": "one loss over every micro batch of a step",
    "independent": "a loss per micro batch, DeepSpeed's plain accumulation",
}


# train.compile
COMPILE_MODES = {
    "none": "eager",
    "model": "torch.compile of the CLIP towers",
    "step": "forward, logit scale and loss compiled as one graph (towers and loss apart with contrastive accumulation)",
}


def check_compile(mode: str, *, stage: int) -> None:
    if mode != "none" and stage not in (1, 2):
        raise ConfigError(
            f"train.compile {mode} needs ZeRO-1 or 2 (train.zero_stage is {stage}): ZeRO-3's parameter gathering "
            "happens in forward hooks a compiled graph would capture, and ZeRO-0's bf16 optimizer synchronizes "
            "every step anyway. Use train.zero_stage 1 or 2, or train.compile none."
        )


# train.precision
PRECISIONS = {
    "auto": "bf16 where the device computes it natively (a GPU from Ampere on, a CPU with AVX-512 or AMX), else fp32",
    "bf16": "bf16 weights and activations, fp32 masters in the optimizer (DeepSpeed's bf16)",
    "amp_bf16": "fp32 weights under torch autocast to bf16: open_clip's amp_bf16 (DeepSpeed's torch_autocast)",
    "fp32": "fp32 throughout (TF32 matmuls on CUDA unless train.tf32 false)",
}


@dataclass
class TrainConfig:
    steps: int = 0  # optimizer steps to run; 0 means train.epochs passes over the train shards
    epochs: int = 3  # passes over the train shards, used when train.steps is 0
    grad_accum: int = 1  # micro batches per optimizer step: the step's contrastive batch is K x batch x ranks
    accum_mode: str = "contrastive"  # with grad_accum > 1: 'contrastive' (one loss over the step) or 'independent'
    zero_stage: int = 2  # DeepSpeed ZeRO stage, 0 to 3 (1 and 2 in bf16 step without host syncs; 0 and 3 sync)
    precision: str = "auto"  # 'auto', 'bf16', 'amp_bf16' (open_clip's: fp32 weights, autocast) or 'fp32' (PRECISIONS)
    # false: the layout before 2026-12, to resume its checkpoints at ZeRO-0/3 or to measure what alignment buys
    align_params: bool = True  # every parameter 16-byte aligned in DeepSpeed's flat buffers (odd sizes last)
    tf32: bool = True  # on CUDA: TF32 tensor cores for fp32 matmuls and convs, cuDNN autotuning
    seed: int = 0  # seeds model init and data order (offset by rank for the data)
    peak_tflops: float | None = None  # the card's dense bf16 TFLOP/s for the logs' mfu; none: known GPUs' datasheets
    compile: str = "none"  # torch.compile: 'none', 'model' (the towers) or 'step' (forward + loss); ZeRO-1/2 only
    compile_backend: str = "inductor"  # torch.compile's backend ('aot_eager' traces without generating code)
    benchmark: int = 0  # > 0: measure this many steps of this run, data excluded and included; no checkpoint or eval
    benchmark_warmup: int = 3  # with benchmark: unmeasured steps before each phase (compilation, allocator, loaders)
    # e.g. "train.zero_stage=1,2 train.precision=bf16,amp_bf16": every combination of the run's own config,
    # measured in alternating rounds, one table (fastclip/benchmark_sweep.py)
    benchmark_try: str | None = None  # with benchmark: settings to try, 'section.field=a,b' items

    def __post_init__(self):
        peak = self.peak_tflops
        _require(peak is None or peak > 0, "train.peak_tflops", f"must be positive, got {peak}")
        modes = "; ".join(f"'{k}' ({v})" for k, v in COMPILE_MODES.items())
        _require(self.compile in COMPILE_MODES, "train.compile", f"must be {modes}; got {self.compile!r}")
        check_compile(self.compile, stage=self.zero_stage)  # before any model is built
        _require(self.benchmark >= 0, "train.benchmark", f"must be >= 0 steps (0: train), got {self.benchmark}")
        _require(self.benchmark != 1, "train.benchmark", "needs at least 2 measured steps for a spread")
        _require(self.benchmark_warmup >= 1, "train.benchmark_warmup", f"must be >= 1, got {self.benchmark_warmup}")
        _require(self.steps >= 0, "train.steps", f"must be >= 0 (0 means use train.epochs), got {self.steps}")
        _require(self.epochs > 0, "train.epochs", f"must be positive, got {self.epochs}")
        _require(self.grad_accum > 0, "train.grad_accum", f"must be positive, got {self.grad_accum}")
        modes = "; ".join(f"'{k}' ({v})" for k, v in ACCUM_MODES.items())
        _require(self.accum_mode in ACCUM_MODES, "train.accum_mode", f"must be {modes}; got {self.accum_mode!r}")
        _require(self.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        kinds = "; ".join(f"'{k}' ({v})" for k, v in PRECISIONS.items())
        _require(self.precision in PRECISIONS, "train.precision", f"must be {kinds}; got {self.precision!r}")


@dataclass
class LogConfig:
    dir: str = "runs/demo"  # metrics.jsonl (appended), the resolved config, TensorBoard events
    every: int = 10  # optimizer steps between log lines; the only steps that copy numbers to the host
    progress: bool = True  # tqdm progress bar on rank 0
    tensorboard: bool = False  # also write TensorBoard scalars to log.dir/tensorboard
    wandb: bool = False  # also log to Weights & Biases (needs `pip install wandb` and a login)
    wandb_project: str = "fastclip"  # W&B project name

    def __post_init__(self):
        _require(self.every > 0, "log.every", f"must be a positive number of steps, got {self.every}")


@dataclass
class CheckpointConfig:
    dir: str = "runs/demo/checkpoints"  # DeepSpeed checkpoints (one folder per step) and open_clip.pt
    every: int = 0  # optimizer steps between checkpoints; 0 saves only at the end
    resume: str | None = None  # 'auto' (latest if any, else step 0: a requeued job), 'latest' (must exist), a folder
    export_open_clip: bool = True  # at the end, write open_clip.pt that open_clip.create_model(pretrained=) loads
    keep: int = 0  # newest step folders to keep, older ones deleted after each save; 0 keeps all
    signal_grace_s: float = 25.0  # after SIGTERM/SIGUSR1/SIGINT: seconds to save, then end without (0: no bound)

    def __post_init__(self):
        _require(self.every >= 0, "checkpoint.every", f"must be >= 0 (0 saves at the end only), got {self.every}")
        _require(self.keep >= 0, "checkpoint.keep", f"must be >= 0 (0 keeps every checkpoint), got {self.keep}")
        _require(self.signal_grace_s >= 0, "checkpoint.signal_grace_s",
                 f"must be >= 0 seconds (0: no bound), got {self.signal_grace_s:g}")  # fmt: skip


@dataclass
class EvalConfig:
    every: int = 0  # optimizer steps between evaluations; 0 evaluates only at the end
    early_stop_patience: int = 0  # stop when val clip loss has not improved for this many evaluations; 0 never
    early_stop_min_delta: float = 0.0  # an improvement must lower the val clip loss by more than this
    zeroshot: bool = True  # zero-shot top-1 when class names and templates are known
    batch_size: int = 0  # eval batch per rank; 0 uses data.batch_size

    def __post_init__(self):
        _require(self.every >= 0, "eval.every", f"must be >= 0, got {self.every}")
        patience, delta = self.early_stop_patience, self.early_stop_min_delta
        _require(patience >= 0, "eval.early_stop_patience", f"must be >= 0 (0 never stops early), got {patience}")
        _require(
            patience == 0 or self.every > 0,
            "eval.early_stop_patience",
            "needs evaluations during training: set eval.every too",
        )
        _require(delta >= 0, "eval.early_stop_min_delta", f"must be >= 0, got {delta}")
        _require(
            self.batch_size >= 0, "eval.batch_size", f"must be >= 0 (0 uses data.batch_size), got {self.batch_size}"
        )


@dataclass
class DistConfig:
    join_timeout_s: float = 600.0  # start-up: seconds to wait for every rank to join; then the missing are named
    timeout_s: float = 1800.0  # a collective that waits longer fails (torch's process-group timeout)
    heartbeat_s: float = 5.0  # each rank tells the others it is alive this often (fastclip/watchdog.py)
    lost_after_s: float = 60.0  # a rank silent this long is lost: every rank exits, naming it and the step

    def __post_init__(self):
        for name in ("join_timeout_s", "timeout_s", "heartbeat_s", "lost_after_s"):
            _require(getattr(self, name) > 0, f"dist.{name}", f"must be a positive number of seconds, got "
                     f"{getattr(self, name)}")  # fmt: skip
        _require(
            self.lost_after_s >= 2 * self.heartbeat_s, "dist.lost_after_s",
            f"must be at least two heartbeats (dist.heartbeat_s={self.heartbeat_s:g}), got {self.lost_after_s:g}",
        )  # fmt: skip


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    deepspeed_config: str | None = None  # a DeepSpeed JSON that replaces the derived one (batch sizes must agree)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
