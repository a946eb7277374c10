"""The one exception type users see: a message that names the problem and the fix."""


class SwitchcitError(Exception):
    """A user-facing error; the CLI prints it on one line and exits non-zero."""
