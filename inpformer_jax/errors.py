"""The one base class of user mistakes.

Every command line catches `UserError` only: its message is printed as one line
(`error: <what, which file or field, the fix>`) and the command exits with status 2. Any other
exception is a bug and keeps its traceback. The specific errors (ConfigError, CheckpointError,
DatasetLayoutError, ...) live beside the code that raises them and derive from this class.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
  """A mistake the user can fix; the message names the file or field and the fix."""


class MissingFileError(UserError, FileNotFoundError):
  """A file or folder the user named is not there (still a FileNotFoundError for callers)."""


class OutputExistsError(UserError, FileExistsError):
  """An output the command would overwrite already exists (still a FileExistsError)."""
