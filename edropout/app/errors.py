"""The main job's user errors: problems with a command's input that the user can fix (a bad option, a missing or
malformed data file, a checkpoint that does not match the run). The command prints the message on one line and
exits with status 2, without a traceback."""
from __future__ import annotations


class UserError(ValueError):
    """A problem the user can fix; the message names what is wrong and how to fix it."""


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded safely, or that belongs to another run."""


class DataError(UserError):
    """A data file that is missing, malformed, or holds values a model cannot train on; the message names it."""
