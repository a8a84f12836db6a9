"""The one exception type that means "the user asked for something we cannot do".

The CLI prints its message as a single line and exits with status 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message names the problem and the fix, on one line."""
