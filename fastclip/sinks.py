"""Where logged numbers go: metrics.jsonl, the console, TensorBoard and wandb. Rank 0 writes; others no-op."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from fastclip.config import Config, LogConfig
from fastclip.console import say
from fastclip.errors import ConfigError


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        if key == "lr":
            return f"{key} {value:.3e}"
        if math.isfinite(value) and abs(value) >= 100:
            return f"{key} {value:.1f}"
        return f"{key} {value:.4f}"
    return f"{key} {value}"


class MetricSinks:
    def __init__(self, log: LogConfig, *, enabled: bool, config: Config):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.file = None
        if not enabled:
            return
        root = Path(log.dir)
        root.mkdir(parents=True, exist_ok=True)
        (root / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
        self.file = open(root / "metrics.jsonl", "a", buffering=1)  # appended: earlier runs' lines stay
        if log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("log.tensorboard: needs the tensorboard package (pip install tensorboard)") from e
            self.tb = SummaryWriter(str(root / "tensorboard"))
        if log.wandb:
            try:
                import wandb
            except ImportError as e:
                raise ConfigError("log.wandb: needs the wandb package (pip install wandb; wandb login)") from e
            self.wandb = wandb.init(project=log.wandb_project, dir=str(root), config=config.to_dict())

    def write(self, record: dict[str, Any], *, console: str | None = None) -> None:
        """Append ``record`` (which has a 'step') to every sink; print ``console`` or the record."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        # strict JSON: a non-finite number is written as null (json.dumps would write the bare NaN of JavaScript)
        finite = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(finite, allow_nan=False) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        say(console or " | ".join(_fmt(k, v) for k, v in record.items() if k != "time"))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def train_line(record: dict[str, Any], *, total_steps: int) -> str:
    """A training log record as its console line."""
    return (
        f"step {record['step']}/{total_steps} | epoch {record['epoch']:.2f} | loss {record['loss']:.4f} | "
        f"lr {record['lr']:.3e} | logit_scale {record['logit_scale']:.2f} | "
        + (f"logit_bias {record['logit_bias']:.2f} | " if "logit_bias" in record else "")
        + (f"grad_norm {record['grad_norm']:.3f} | " if "grad_norm" in record else "")
        + f"{record['samples_per_second']:.1f} samples/s ({record['samples_per_second_per_gpu']:.1f}/GPU) | "
        f"data {1e3 * record['data_time']:.1f} ms | batch {1e3 * record['batch_time']:.1f} ms"
        + (f" | mfu {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "")
        + (f" | mem {record['peak_memory_gb']:.1f} GB" if record.get("peak_memory_gb") is not None else "")
    )


def eval_line(step: int, metrics: dict[str, float]) -> str:
    """An eval's metrics as its console line (the sample count in front, the time left to the record)."""
    parts = [f"{k[4:]} {v:.4f}" for k, v in metrics.items() if k not in ("val/samples", "val/time")]
    return f"eval step {step} ({int(metrics['val/samples'])} samples): " + " | ".join(parts)


def progress_bar(*, enabled: bool, total: int, done: int):
    """A tqdm bar on a terminal (rank 0, log.progress); None where output goes to a file, which gets the log
    lines rather than carriage-return redraws."""
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True)
