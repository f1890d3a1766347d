"""The root command. Each subcommand lives in its own module and only gathers options, calls one
engine function and prints; this module holds the one error boundary for all of them."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from .. import __version__
from ..errors import BigModelError
from . import console


# typer vendors its own click; its UsageError (a value that does not parse, an unknown option or
# command, a missing argument) is reached through the public BadParameter, which derives from it.
USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")


class BigModelGroup(TyperGroup):
    """Maps exceptions to exit codes: a BigModelError is one red line and its exit code (2 for the
    user's mistakes); anything else is an internal error (exit 1). No traceback unless BIGMODEL_DEBUG=1."""

    # Set while `bigmodel run` invokes a step: the error goes up to the run, which names the step.
    pass_through = False

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            console.error("interrupted; outputs are written atomically, so nothing half-written was left")
            raise typer.Exit(130) from None
        except USAGE_ERROR as exc:
            # An option or argument that does not parse (a word for a number, an unknown option, a
            # missing argument) is a user mistake like any other: one line, exit 2, not click's
            # usage box.
            if BigModelGroup.pass_through or not exc.format_message():
                raise  # (no message: a group called without its subcommand, which shows its help)
            raise usage_line(exc) from None
        except Exception as exc:
            # Typer's (click's) own exceptions carry exits: let them through.
            is_cli = type(exc).__module__.split(".")[0] in ("typer", "click")
            if is_cli or BigModelGroup.pass_through or os.environ.get("BIGMODEL_DEBUG") == "1":
                raise
            message, code = describe_failure(exc)
            console.error(message)
            raise typer.Exit(code) from None

    def parse_args(self, ctx, args):
        # The root's own options (`bigmodel --bogus`) are parsed here, before invoke.
        try:
            return super().parse_args(ctx, args)
        except USAGE_ERROR as exc:
            if not exc.format_message():
                raise
            raise usage_line(exc) from None

    def list_commands(self, ctx):  # keep the order in which commands were added
        return list(self.commands)


def usage_line(exc) -> typer.Exit:
    """Print click's usage error as one line (what is wrong; where the help is); the exit to raise."""
    where = f"; see {exc.ctx.command_path if exc.ctx is not None else 'bigmodel'} --help"
    console.error(f"{exc.format_message().rstrip('.')}{where}")
    return typer.Exit(2)


def describe_failure(exc: Exception) -> tuple[str, int]:
    """The one line and exit code for an exception that reached the boundary."""
    if isinstance(exc, BigModelError):
        return str(exc), exc.exit_code
    if isinstance(exc, OSError):
        # A write the OS refused (full disk, read-only location) is the user's to fix, not a bug.
        from ..artifact import storage_problem

        problem = storage_problem(exc)
        if problem:
            return f"{exc.filename or 'output'}: {problem}; free space or choose another location", 2
    return f"internal error: {type(exc).__name__}: {exc} (BIGMODEL_DEBUG=1 shows the traceback; please report it)", 1


app = typer.Typer(
    cls=BigModelGroup,
    help="Train, prune, quantize, distill and export neural networks — and measure what each step bought.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"bigmodel {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    trust_model_code: Annotated[bool, typer.Option("--trust-model-code", help="Allow artifacts whose model is a user's Python file (model.py) to run that code.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    from ..models.user import set_trust_model_code

    # Per invocation: trust given to one command (or one step of a run) must not outlive it.
    set_trust_model_code(trust_model_code)


# (command, module in cli/, function): the whole command line, in the order `--help` lists it.
COMMANDS = [
    ("train", "train", "train"),
    ("eval", "evaluate", "eval_command"),
    ("prune", "prune", "prune"),
    ("quantize", "quantize", "quantize"),
    ("distill", "distill", "distill"),
    ("export", "export", "export"),
    ("import", "import_model", "import_command"),
    ("run", "run", "run"),
    ("optimize", "optimize", "optimize"),
    ("compare", "compare", "compare"),
    ("plot", "compare", "plot"),
    ("predict", "predict", "predict"),
    ("generate", "generate", "generate"),
    ("chat", "chat", "chat"),
    ("explain", "explain", "explain_command"),
    ("info", "info", "info"),
    ("models", "listing", "models"),
    ("datasets", "listing", "datasets"),
    ("estimate", "estimate", "estimate"),
]


def summary(doc: str | None) -> str | None:
    """A command's line in `bigmodel --help`: its docstring's first paragraph as one paragraph (the
    docstring's own line breaks would break the list's lines where the source did)."""
    return " ".join(doc.split("\n\n")[0].split()) if doc else None


def _register() -> None:
    import importlib

    for name, module, function in COMMANDS:
        command = getattr(importlib.import_module(f"{__name__}.{module}"), function)
        app.command(name, short_help=summary(command.__doc__))(command)
    # Started by `quantize --qat --nproc` for its workers, never by hand.
    app.command("qat-worker", hidden=True)(importlib.import_module(f"{__name__}.quantize").qat_worker)
    # Command groups (a noun with its own verbs).
    app.add_typer(importlib.import_module(f"{__name__}.tokenizer").app, name="tokenizer")


_register()


def main() -> None:
    app(prog_name="bigmodel")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
