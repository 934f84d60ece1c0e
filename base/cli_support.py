"""What every showtell command shares around its own work (cli.py declares the commands and their options):
errors turned into one `Error:` line and an exit status, the prechecks and the never-destroy check run before
TensorFlow starts, option stacking, parsed options to a config dataclass, progress lines on stderr, the
command's precision, and text kept on one line.

Exit status: 2 for a bad argument (`InputError`, like click's own usage errors), 1 for a run that stopped
without a right result (`RunStopped`, a full or read-only disk), 130 for Ctrl-C. Importing this module
imports no TensorFlow (`cli.py --help` stays fast).
"""

from __future__ import annotations

import dataclasses
import math

import click

from base.devices import precision_line, quiet_tensorflow, using_precision
from base.errors import InputError, RunStopped, write_failure
from base.outputs import check_command


class _BadInput(click.ClickException):
    """Printed by click as `Error: <message>`; exit status 2 like click's own usage errors."""

    exit_code = 2


class _Stopped(click.ClickException):
    """Printed as `Error: <message>`; exit status 1: the run stopped without a right result."""

    exit_code = 1


class _Interrupted(click.ClickException):
    """Ctrl-C: `Error: interrupted ...` saying how to go on; exit status 130 (128 + SIGINT) as a shell's."""

    exit_code = 130

    def __init__(self, resumable: bool):
        super().__init__("interrupted: rerun the same command to resume." if resumable else
                         "interrupted: outputs are written whole or not at all, so nothing was left half-"
                         "written; rerun the same command to start again.")


class Command(click.Command):
    """A command that runs its `prechecks` (functions of the parsed options dict raising click.UsageError or
    InputError: checks across options or on the filesystem) and base.outputs.check_command (never destroy;
    its notes name what is replaced), then starts TensorFlow quietly (no CUDA/oneDNN start-up noise on a
    CPU-only machine; real errors still shown) unless `tensorflow=False`, so usage errors come back at once.
    A `--precision` option is then resolved (`run_precision`) and the command gets the chosen precision,
    unless `own_precision=True` (the command resolves it itself: extract in its run, caption after checking
    its output paths).
    Given as `@main.command(name, prechecks=(check, ...))`."""

    def __init__(self, *args, prechecks=(), tensorflow: bool = True, own_precision: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.prechecks, self.tensorflow = tuple(prechecks), tensorflow
        self.own_precision = own_precision

    def invoke(self, ctx):
        for check in self.prechecks:
            check(ctx.params)
        for note in check_command(self.name, ctx.params):
            click.echo(note, err=True)
        if self.tensorflow:
            quiet_tensorflow()
        if "precision" in ctx.params and not self.own_precision:
            ctx.params["precision"] = run_precision(ctx.params["precision"], self.name)
        return super().invoke(ctx)


class Group(click.Group):
    """A click group of `Command`s that turns `InputError` into a one-line `Error: ...` and exit status 2,
    `RunStopped` and a failed write (base.errors.write_failure) into `Error: ...` and exit status 1, and
    Ctrl-C into exit status 130 with what to do next (`resumable`: the names of the commands that a rerun
    continues)."""

    command_class = Command

    def __init__(self, *args, resumable=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.resumable = frozenset(resumable)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as err:
            raise _BadInput(str(err)) from None
        except RunStopped as err:
            raise _Stopped(str(err)) from None
        except KeyboardInterrupt:
            raise _Interrupted(ctx.invoked_subcommand in self.resumable) from None
        except Exception as err:  # a full or read-only disk: one line, exit 1; anything else: the traceback
            message = write_failure(err)
            if message is None:
                raise
            raise _Stopped(message) from None


class FiniteRange(click.FloatRange):
    """click.FloatRange that also refuses NaN and +-inf (FloatRange lets NaN through: every comparison with
    NaN is false). The range is checked while parsing, so the usage error comes before TensorFlow starts."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return number


def stack(*options):
    """A decorator applying click `options` in the order given (as if stacked top to bottom)."""

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def fields(cls, params: dict) -> dict:
    """The parsed options of a command (`params`) named like a field of dataclass `cls`, a repeatable
    option's tuple as a list."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if k in names}


def config(cls, params: dict, **given):
    """Dataclass `cls` from a command's parsed options (`fields`) and `given` (e.g. progress=not
    no_progress); the fields given neither way keep their defaults."""
    return cls(**{**fields(cls, params), **given})


def log(message: str) -> None:
    """A command's progress line: to stderr, so stdout holds only the result."""
    click.echo(message, err=True)


def run_precision(requested: str, command: str) -> str:
    """The precision `command` runs in (--precision; auto: base.devices.auto_precision), printed once; it
    stays the CNN's inference precision (base.devices.using_precision) until the command ends."""
    chosen, line = precision_line(requested, command)
    log(line)
    return click.get_current_context().with_resource(using_precision(chosen))


def one_line(text) -> str:
    """`text` (str() of it) with control characters escaped: a file name holding a newline stays on its
    line ("a\\nb")."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in str(text))
