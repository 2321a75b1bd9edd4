"""The one output channel of a run: the ``fastclip`` logger, written through tqdm so that no line tears the
progress bar. INFO lines (progress, checkpoints, resume) go to stdout from rank 0 only; warnings (a skipped
sample or shard, from any rank or loader worker) and errors go to stderr from wherever they happen.

Nothing is installed at import: :func:`setup` runs when a run starts (the entry point and the Trainer call it;
it is idempotent), so importing fastclip as a library leaves the host program's logging alone.
"""

from __future__ import annotations

import logging
import sys

log = logging.getLogger("fastclip")


class _TqdmHandler(logging.Handler):
    """Writes through ``tqdm.write``, to the stream the level asks for, looked up at each line (so that a test's
    capture, or a worker process's inherited stream, is the one written to), and flushes: a loader worker may be
    stopped before a buffer would be."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and self.rank != 0:
            return
        stream = sys.stdout if record.levelno < logging.WARNING else sys.stderr
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # noqa: BLE001 (logging's own rule: a handler never raises)
            self.handleError(record)


def setup(rank: int) -> None:
    """Route the ``fastclip`` logger (and its children, ``fastclip.data`` among them) to the console."""
    handler = next((h for h in log.handlers if isinstance(h, _TqdmHandler)), None)
    if handler is None:
        handler = _TqdmHandler(rank)
        log.addHandler(handler)
        log.propagate = False  # a host program's root handlers would print every line twice
    handler.rank = rank
    log.setLevel(logging.INFO)


def say(message: str) -> None:
    """One line for the user (rank 0's console)."""
    log.info(message)


def counted(n: int, noun: str) -> str:
    """'1 shard', '41,407 shards': a count with its noun."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
