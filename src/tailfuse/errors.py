"""User-facing errors: raised with a message that names the file, row or column and the fix."""


class TailfuseError(Exception):
    """An error caused by the user's input or settings. The CLI prints the message without a traceback."""
