"""The errors a user causes, defined below every module that raises them.

The command-line entry points (`jaxscore.infra.entry`) report any `UserError` in one line
with exit status 2 and no traceback; anything else is a bug and keeps its traceback. Each
module that raises one re-exports it (`tasks.DataError`, `models.weights.CheckpointError`,
...), so callers catch it where they meet it.
"""


class UserError(ValueError):
  """An input that cannot work as given: reported in one line that names it."""


class UsageError(UserError):
  """A command line (flags, a config) that cannot work as given."""


class DataError(UserError):
  """A dataset file is unreadable, malformed, or lacks a required field."""


class CheckpointError(UserError):
  """A checkpoint is missing a tensor, has a wrong shape, or cannot be read."""


class ShardingError(UserError):
  """A mesh that does not fit the devices, or an axis that does not divide a dimension."""


class ExportError(UserError):
  """A missing run, config or checkpoint to export."""
