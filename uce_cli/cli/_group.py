"""The app's command group: a usage error is one ``error:`` line and exit 2, as every uce error is.

Typer renders a bad option value as a usage block plus ``Error: Invalid value for '--x': Value
error, …`` over several lines. ``UceGroup.main`` runs the commands the same way but renders
Click's errors itself: one line naming the option and the value, and where the help is.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

import typer
from typer.core import TyperGroup

from uce_cli.interrupt import interrupted, stop_listening

# Click's base error class, reached through Typer's public API (Typer vendors Click since 0.26).
ClickError: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)


def usage_line(exc: Exception) -> str:
    """A Click error as one line: its message without pydantic's prefix, and where help is."""
    message = " ".join(line.strip() for line in exc.format_message().splitlines() if line.strip())
    message = message.replace("Value error, ", "")
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and type(exc).__name__ != "ClickException":
        message = f"{message.rstrip('.')} — see '{ctx.command_path} -h'"
    return message


def _exit(code: int, line: str | None = None) -> NoReturn:
    if line is not None:
        print(f"error: {line}", file=sys.stderr)
    sys.exit(code)


class UceGroup(TyperGroup):
    """Typer's group, with Click's usage errors rendered as one ``error:`` line (exit 2)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Run the command line; in standalone mode exit with its code, rendering errors in one line."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            _exit(1, "aborted")
        except ClickError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # `uce` alone: the help, on stderr
                exc.show()
                _exit(exc.exit_code)
            _exit(exc.exit_code, usage_line(exc))
        except KeyboardInterrupt:  # raised outside a command (Typer maps most of them to 130)
            stop_listening()
            _exit(130, "interrupted")
        if code == 130 and interrupted() and stop_listening():
            _exit(130, "interrupted")  # Typer turned a Ctrl-C while parsing into a silent 130
        _exit(code if isinstance(code, int) else 0)
