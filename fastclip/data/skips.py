"""The log of samples a loader drops because their image does not decode: each one named, all of them counted."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("fastclip.data")
if not log.handlers:  # loader workers are separate processes: each writes its skips straight to fd 2
    log.addHandler(logging.StreamHandler(os.fdopen(2, "w", buffering=1, closefd=False)))
    log.propagate = False


class Skips:
    """Counts samples dropped because their image does not decode, and says which, in the log."""

    def __init__(self, where: str = "in this worker"):
        self.count, self.where = 0, where

    def skip(self, *, key: str | None, shard: str | None, error: Exception | str) -> None:
        self.count += 1
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        log.warning(
            "skipped sample %s in shard %s: its image does not decode (%s); %d skipped so far %s",
            key, shard, reason, self.count, self.where,
        )  # fmt: skip
