"""One base class for errors a user can fix: the CLI prints their message (which names the file or config key and
the fix) without a traceback."""


class UserError(Exception):
    pass
