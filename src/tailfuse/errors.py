"""User-facing errors: raised with a message that names the file, row or column and the fix."""


class TailfuseError(Exception):
    """An error caused by the user's input or settings. The CLI prints the message without a traceback."""


def q(value) -> str:
    """A path or name as it must appear in a command a message suggests, quoted for the shell where needed (a run
    folder with spaces), so the command can be pasted."""
    import shlex

    return shlex.quote(str(value))
