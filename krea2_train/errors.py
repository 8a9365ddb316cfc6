"""One base class for errors a user can fix: the CLI prints their message (which names the file or config key and
the fix) without a traceback."""


class UserError(Exception):
    pass


class ModelLoadError(UserError, RuntimeError):
    """A model file cannot be used. The message names the file and what to do."""
