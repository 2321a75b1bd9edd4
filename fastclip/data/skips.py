"""The log of samples a loader drops because their image does not decode: each one named, all of them counted."""

from __future__ import annotations

import logging
import multiprocessing
import os

log = logging.getLogger("fastclip.data")
if not log.handlers:  # loader workers are separate processes: each writes its skips straight to fd 2
    log.addHandler(logging.StreamHandler(os.fdopen(2, "w", buffering=1, closefd=False)))
    log.propagate = False


def describe(data: bytes) -> str:
    """What is wrong with image bytes that did not decode, from their first and last bytes: decoders' own messages
    ('nvImageCodec failure: #4', 'Unsupported marker type') rarely say."""
    if not data:
        return "the image file is empty"
    if data[:3] == b"\xff\xd8\xff":
        if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
            return "a JPEG cut short or damaged (no end-of-image marker)"
        return "a damaged JPEG (its markers are in place, its data is not)"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "a PNG cut short or damaged" if b"IEND" not in data[-16:] else "a damaged PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "a damaged WebP"
    return f"not a JPEG, PNG or WebP file (it starts with {data[:8].hex(' ')})"


class Skips:
    """Counts samples dropped because their image does not decode, and says which, in the log.

    The count is per rank: with ``shared`` it lives in shared memory, so that a rank's loader worker processes
    and its main process add to one total (workers are forked or spawned with it)."""

    def __init__(self, *, rank: int, shared: bool = False):
        self.rank = rank
        self._count = multiprocessing.Value("q", 0) if shared else None
        self._local = 0

    @property
    def count(self) -> int:
        return self._count.value if self._count is not None else self._local

    def _add(self) -> int:
        if self._count is None:
            self._local += 1
            return self._local
        with self._count.get_lock():
            self._count.value += 1
            return self._count.value

    def skip(self, *, key: str | None, shard: str | None, data: bytes | None, error: Exception | str) -> None:
        total = self._add()
        said = str(error).strip().splitlines()[-1].strip() if str(error).strip() else type(error).__name__
        reason = f"{describe(data)}; the decoder said: {said}" if data is not None else said
        log.warning(
            "skipped sample %s in shard %s: its image does not decode (%s); %d skipped so far on rank %d",
            key, shard, reason, total, self.rank,
        )  # fmt: skip
