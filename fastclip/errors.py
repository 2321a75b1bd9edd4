"""Errors a user acts on, importable from every layer: each message names the field, file or rank and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input problem the user must fix; the message names the field and the fix."""


class DataError(ConfigError):
    """The data itself, not the command, is what must change (a CSV with no usable row, a folder without
    images): the shard tools exit 1 on it, 2 on a usage or configuration error."""


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; raised at a logging or checkpoint step, before anything is saved."""


class OutOfMemory(RuntimeError):
    """A training step did not fit in memory; the message names the batch that did not and what to lower."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed or written; raised on the rank that meets it (each rank has its own
    files)."""
