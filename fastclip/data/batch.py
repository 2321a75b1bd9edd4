"""The batch every loader yields to the training step."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import torch

# The streams' seed scheme: a position saved under another one would replay other samples. Raised when the seeds a
# loader derives change (fastclip/data/loader.py derive_seed); positions of another scheme start the stream afresh.
STREAMS_VERSION = 3  # 3: the torch loader splits each shard among slots by its place in the order


def check_stream(state: dict[str, Any], loader: str) -> None:
    """ValueError (the reason a position cannot be restored) unless ``state`` is ``loader``'s, of this scheme."""
    if state.get("loader") != loader:
        raise ValueError(f"the position was saved by the {state.get('loader')} loader, this is the {loader} loader")
    if state.get("streams", 1) != STREAMS_VERSION:
        raise ValueError("the position was saved by a fastclip whose data streams were seeded otherwise")


@dataclass(frozen=True)
class DataPosition:
    """Where a rank's DALI train stream stands after a batch: the reader's checkpoint before the read that held
    the batch's last sample, and how many samples of that read the batch consumed. Restoring it replays the
    same samples in the same order (random crops are drawn afresh), also after skipped images: batches leave
    the loader in read order (fastclip/data/dali.py ``_recall``)."""

    reader: bytes  # DALI's pipeline checkpoint
    consumed: int

    def state(self) -> dict[str, Any]:
        reader = base64.b64encode(self.reader).decode()
        return {"loader": "dali", "streams": STREAMS_VERSION, "reader": reader, "consumed": self.consumed}


@dataclass(frozen=True)
class BatchCount:
    """Where a rank's torch-loader train stream stands: batches taken from its DataLoader, and the samples each
    worker's stream had read (undecodable ones included, which no batch shows). The streams are deterministic, so
    restoring replays each one and drops what it had read, reading those samples' bytes but not decoding them."""

    batches: int
    workers: int  # the replay is exact only with as many DataLoader workers
    reads: tuple[int, ...] = ()
    held: int = 0  # samples kept back to refill the next batch (after the GPU decode skipped one): not replayed

    def state(self) -> dict[str, Any]:
        counts = {"batches": self.batches, "workers": self.workers, "reads": list(self.reads), "held": self.held}
        return {"loader": "torch", "streams": STREAMS_VERSION, **counts}


@dataclass
class Batch:
    images: torch.Tensor  # [B, 3, H, W], normalized, on the step's device
    texts: torch.Tensor  # [B, context_length] token ids (int64)
    labels: torch.Tensor | None = None  # [B] class index from KEY.cls, -1 where absent (val only)
    position: DataPosition | BatchCount | None = None  # the train stream's position after this batch
