"""The ``uce`` command line: one module per command, each parse → call the library → render."""

from __future__ import annotations

import os
import sys

from uce_cli.interrupt import interrupted, stop_listening, watch_sigint


def _exit_interrupted() -> None:
    stop_listening()
    print("error: interrupted", file=sys.stderr)
    raise SystemExit(130) from None


# Loading the CLI (Typer, Rich, pydantic) takes a noticeable moment: Ctrl-C then is an
# interruption like any other, not a traceback.
try:
    import typer

    from uce_cli import __version__
    from uce_cli.cli._common import CONTEXT_SETTINGS
    from uce_cli.cli._group import UceGroup
    from uce_cli.cli.apply import apply
    from uce_cli.cli.attack import attack
    from uce_cli.cli.compare import compare
    from uce_cli.cli.eval import eval_
    from uce_cli.cli.merge import merge
    from uce_cli.cli.sample import sample
    from uce_cli.cli.show import show
    from uce_cli.cli.transfer import transfer
    from uce_cli.cli.validate import validate
    from uce_cli.cli.verify import verify
except KeyboardInterrupt:
    _exit_interrupted()
except Exception as _exc:  # a module left half-imported by a Ctrl-C, or one pydantic-core wrapped
    from uce_cli.errors import is_interrupt

    if not (interrupted(_exc) or is_interrupt(_exc)):
        raise
    _exit_interrupted()

# Third-party chatter (download bars, backend notices) would bury uce's own stderr; errors still show.
for _var, _value in (
    ("TRANSFORMERS_VERBOSITY", "error"),
    ("DIFFUSERS_VERBOSITY", "error"),
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
    ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
):
    os.environ.setdefault(_var, _value)

app = typer.Typer(
    name="uce",
    help="Unified Concept Editing: erase, moderate, debias and preserve concepts in text-to-image "
    "diffusion models, in closed form.",
    no_args_is_help=True,
    cls=UceGroup,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT_SETTINGS,
)
for _command in (validate, apply, show, merge, transfer, verify, sample):
    app.command(context_settings=CONTEXT_SETTINGS)(_command)
app.command("eval", context_settings=CONTEXT_SETTINGS)(eval_)
app.command(context_settings=CONTEXT_SETTINGS)(compare)
app.command(context_settings=CONTEXT_SETTINGS)(attack)


def _version(value: bool) -> None:
    if value:
        print(f"uce {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """Unified Concept Editing for text-to-image diffusion models."""


def main() -> None:
    """Console-script entry point."""
    watch_sigint()  # a Ctrl-C from here on is reported as an interruption, whatever it breaks
    try:
        app()
    except KeyboardInterrupt:  # outside a command's own error boundary
        _exit_interrupted()
    except Exception as exc:
        if not interrupted(exc):
            raise
        _exit_interrupted()
