"""User-facing errors. The CLI prints `error: <message>` and exits 2 for these.

Every message names the file, tensor, field, op or task at fault and says
what was expected versus what was found.
"""


class TilecompError(Exception):
    """Base class of every error a user can cause with bad input."""


class ConfigError(TilecompError):
    """A config.json field is missing, misspelled, or has a bad value."""


class CheckpointError(TilecompError):
    """A checkpoint file or tensor is missing, truncated, or has the wrong shape/dtype."""


class IRError(TilecompError):
    """An IR text does not parse, or an IR object does not verify (names the line / op)."""


class ScheduleError(TilecompError):
    """A tile schedule can deadlock or breaks the interpreter order."""


class DeadlockError(TilecompError):
    """A bounded wait in a megakernel timed out (names task, counter, value, target)."""
