"""How the user started showtell: the start of every command line printed for them to copy.

`showtell …` when they ran the console script (`pip install showtell`), `python cli.py …` (the path as they
typed it) when they ran the checkout's cli.py. Called in-process (tests, notebooks), the package's own
location decides: a checkout (cli.py next to setup.cfg) prints `python cli.py`, an installed copy `showtell`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

CONSOLE_SCRIPT = "showtell"  # setup.cfg [options.entry_points] console_scripts name
_ROOT = Path(__file__).resolve().parent.parent  # where cli.py and the packages live


def program_name(argv0: str | None = None) -> str:
    """The program part of a printed command: "showtell" or "python <path of cli.py as typed>".

    argv0: what sys.argv[0] holds (default: the running process's).
    """
    argv0 = sys.argv[0] if argv0 is None else argv0
    name = Path(argv0).name.lower()
    if name in (CONSOLE_SCRIPT, f"{CONSOLE_SCRIPT}.exe", f"{CONSOLE_SCRIPT}-script.py"):
        return CONSOLE_SCRIPT
    if name == "cli.py":
        return f"python {shlex.quote(argv0)}"
    in_checkout = (_ROOT / "cli.py").is_file() and (_ROOT / "setup.cfg").is_file()
    return "python cli.py" if in_checkout else CONSOLE_SCRIPT


def command_line(*args) -> str:
    """A command to copy: program_name() then the shell-quoted arguments (any objects, str() each)."""
    return " ".join([program_name(), *(shlex.quote(str(a)) for a in args)])
