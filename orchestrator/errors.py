"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """Bad input the user can fix: the message names the thing and the fix, on one line."""
