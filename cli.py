"""showtell command line: `python cli.py --help`.

Each command parses its options, calls one package function and prints. Nothing else reads argv or the
environment. A bad argument raises `data.errors.InputError`, printed as one sentence with exit status 2.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import click  # noqa: E402

from data.errors import InputError  # noqa: E402

__version__ = "0.1.0"


class _BadInput(click.ClickException):
    """Printed by click as `Error: <message>`; exit status 2 like click's own usage errors."""

    exit_code = 2


class _Group(click.Group):
    """A click group that turns `InputError` into a one-line `Error: ...` and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as err:
            raise _BadInput(str(err)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="showtell")
def main():
    """showtell: train a Show and Tell (im2txt) image captioner from cached InceptionV3 features.

    Pipeline: extract -> train-decoder -> (finetune) -> caption / evaluate. `demo` runs it all on a
    generated sample in a few minutes on a CPU.
    """


# ---- commands (each lands with its issue) ---------------------------------------------------------------


if __name__ == "__main__":
    main()
