"""Error types shared by every package.

`InputError` is the one way a bad *argument* stops a command: its message is one clear sentence naming the
file (and entry) at fault. `cli.py` prints it as `Error: <message>` and exits with status 2, before any
work starts. Bad *data items* inside a long run (one broken image among thousands) are not errors: they are
skipped, counted and reported by the run that meets them.
"""

import errno


class InputError(Exception):
    """A bad argument or input file: stop at once with this one-sentence message."""


class RunStopped(Exception):
    """A long run stopped before it could produce a right result (disk full, training diverged): what was
    committed is kept, the message says what happened and what to do; `cli.py` exits with status 1."""


# A write that fails for lack of room or rights is not a bug: `cli.py` prints `write_failure`'s one line and
# exits with status 1 (every write is atomic, so what was written before stays whole).
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
               errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied"}
_DISK_TEXTS = ("No space left on device", "Read-only file system", "Disk quota exceeded", "Permission denied")
_TF_WRITE_ERRORS = {"ResourceExhaustedError", "PermissionDeniedError", "FailedPreconditionError",
                    "UnknownError", "InternalError", "UnavailableError"}


def write_failure(err: BaseException) -> str | None:
    """The one-line message for a write that failed for lack of room or rights (OSError ENOSPC / EROFS /
    EDQUOT / EACCES / EPERM, or TensorFlow's error wrapping one, e.g. ResourceExhaustedError from a
    SavedModel write); None for any other error (a real bug keeps its traceback)."""
    if isinstance(err, OSError) and err.errno in DISK_ERRNOS:
        where = f" ({err.filename})" if err.filename else ""
        why = DISK_ERRNOS[err.errno]
    elif type(err).__name__ in _TF_WRITE_ERRORS and any(t in str(err) for t in _DISK_TEXTS):
        why = next(t for t in _DISK_TEXTS if t in str(err)).lower()
        where = ""
    else:
        return None
    what = "permission denied" if why == "permission denied" else f"a write failed: {why}"
    return (f"{what}{where}. Files written before are kept as they were (the last good checkpoint, an "
            "earlier output); free space or fix the permissions and rerun the same command.")
