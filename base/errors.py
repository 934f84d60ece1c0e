"""Error types shared by every package.

`InputError` is the one way a bad *argument* stops a command: its message is one clear sentence naming the
file (and entry) at fault. `cli.py` prints it as `Error: <message>` and exits with status 2, before any
work starts. Bad *data items* inside a long run (one broken image among thousands) are not errors: they are
skipped, counted and reported by the run that meets them.
"""


class InputError(Exception):
    """A bad argument or input file: stop at once with this one-sentence message."""


class RunStopped(Exception):
    """A long run stopped before it could produce a right result (disk full, training diverged): what was
    committed is kept, the message says what happened and what to do; `cli.py` exits with status 1."""
