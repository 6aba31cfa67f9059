"""User-facing errors: one line that names the file or field and the fix.

The CLI prints `error: <message>` and exits with code 2 for any `UserError`; it never
shows a traceback for bad input.
"""


class UserError(Exception):
    """Bad input or configuration that the user can fix."""


class DataError(UserError):
    """A data folder, image file or caption file cannot be used."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during training: the run checkpointed the last finished step and stopped."""
