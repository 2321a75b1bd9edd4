"""The log of samples a loader drops because their image does not decode: each one named, all of them counted."""

from __future__ import annotations

import logging
import multiprocessing

log = logging.getLogger("fastclip.data")  # a child of fastclip.console's logger: the run's console, or stderr


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


class Undecodable(Exception):
    """A sample's image did not decode: the one failure a loader's stream skips (any other is a bug, and raises)."""


class DataBroken(RuntimeError):
    """So many samples in a row held no image that decodes that the data is broken, not a sample: the run stops
    (rather than skipping forever)."""

    @classmethod
    def from_worker(cls, error: Exception) -> DataBroken:
        """The one-line message of a DataBroken raised in a DataLoader worker (torch re-raises it with the
        worker's traceback as its text)."""
        line = str(error).strip().splitlines()[-1]
        return cls(line.split(f"{cls.__name__}: ", 1)[-1])


class Skips:
    """Counts samples dropped because their image does not decode, and says which, in the log.

    The count is per rank: with ``shared`` it lives in shared memory, so that a rank's loader worker processes
    and its main process add to one total (workers are forked or spawned with it). ``limit`` skips in a row
    (with no :meth:`kept` between them, in one process) raise :class:`DataBroken`."""

    def __init__(self, *, rank: int, shared: bool = False, limit: int | None = None):
        self.rank, self.limit, self.in_a_row = rank, limit, 0
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
        self.in_a_row += 1
        if self.limit is not None and self.in_a_row >= self.limit:
            raise DataBroken(
                f"{self.in_a_row} samples in a row on rank {self.rank} held no image that decodes (the last: {key} in "
                f"shard {shard}: {reason}; {total} skipped in all): the data is broken, not a sample. Check the "
                "shards' image files."
            )

    def kept(self) -> None:
        """A sample decoded: the run of skips in a row is over."""
        self.in_a_row = 0
