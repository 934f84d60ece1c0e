"""Exclusive locks on outputs (a feature store, a model dir) for the whole run of a command.

A lock is an `fcntl.flock` on a small lock file (`<store>.lock` beside a store, `<model dir>/.lock` in a
model dir) that holds the owner's pid. The kernel drops a flock when its process dies, so a lock left by a
killed run never blocks the next one; a second live run on the same output is refused with one sentence.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from base.errors import InputError


def lock_path(target, folder: bool) -> Path:
    """The lock file of `target`: `<target>/.lock` for a folder (model dir), else `<target>.lock`."""
    target = Path(target)
    return target / ".lock" if folder else target.with_name(target.name + ".lock")


@contextlib.contextmanager
def exclusive(target, folder: bool, what: str | None = None):
    """Hold an exclusive lock on `target` (a store file, or a model dir when `folder`) while the block runs.

    InputError "`<target>` is in use by another showtell process (pid N)" when a live process holds it.
    The lock file is left in place (removing it would race with a waiting process); it is tiny."""
    path = lock_path(target, folder)
    created = not path.parent.exists()  # a folder made only for the lock is removed again if left empty
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise InputError(f"{what or target} is in use by another showtell process (pid {owner}); "
                             "wait for it to finish or stop it first.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the flock
        if created and [p.name for p in path.parent.iterdir()] == [path.name]:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()
