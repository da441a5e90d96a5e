"""The one exception type for bad user input.

The CLI catches `MAEError`, prints its message on one line and exits with status 2, so every message
must name the problem and the fix. Programming errors stay ordinary exceptions with tracebacks.
"""


class MAEError(Exception):
    """Bad input from the user (a path, a config value, a checkpoint): the message says what and how to fix."""
