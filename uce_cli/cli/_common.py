"""What every command shares: option aliases, the error boundary, JSON output."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Annotated, Any, NoReturn, TextIO, TypeVar

import typer

from uce_cli.errors import RecipeError, UceError, UceWarning, is_interrupt
from uce_cli.interrupt import interrupted, stop_listening
from uce_cli.threads import use_threads

F = TypeVar("F", bound=Callable[..., Any])

# `-h` as well as `--help`, on the app and on every command.
CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"]}


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class Dtype(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


DeviceOpt = Annotated[
    Device, typer.Option("--device", help="Where to encode: auto picks CUDA, then MPS, then CPU.")
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option(
        "--dtype",
        help="Text-encoder compute dtype (auto: fp16 on CUDA — bf16 for T5/Gemma models — else fp32). "
        "The solve is always float64; weights keep their stored dtype.",
    ),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No progress bars or status on stderr.")
]


def _set_threads(threads: int | None) -> int | None:
    """Apply the thread count once, while the command line is parsed (before torch is loaded)."""
    use_threads(threads)
    return threads


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        envvar="UCE_THREADS",
        callback=_set_threads,
        help="CPU threads (default: OMP_NUM_THREADS if set, else the CPUs this process may use — "
        "its affinity and cgroup quota). On a machine shared with other jobs, 1 is often fastest.",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")
]


def print_error(message: str) -> None:
    """``error: …`` on stderr, one line per problem."""
    for line in message.splitlines() or [""]:
        print(f"error: {line}", file=sys.stderr)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """Show the library's ``UceWarning``s as ``warning: …`` lines on stderr, each text once."""
    shown: set[str] = set()
    default = warnings.showwarning

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not issubclass(category, UceWarning):
            default(message, category, filename, lineno, file, line)
        elif str(message) not in shown:
            shown.add(str(message))
            for text in str(message).splitlines() or [""]:
                print(f"warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UceWarning)
        warnings.showwarning = show
        yield


# OS errors that the machine, not uce, causes (a full or read-only disk, permissions), with what to
# do: one line like any other user error, wherever they arise (images, caches, outputs).
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some disk space and run again (finished files are kept)",
    errno.EDQUOT: "free some disk space and run again (finished files are kept)",
    errno.EROFS: "the file system is read-only: choose a writable --out",
    errno.EACCES: "check the permissions, or choose another --out",
    errno.EPERM: "check the permissions, or choose another --out",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the disk reported an I/O error: check it and run again",
}


def handle_errors(func: F) -> F:
    """Turn library errors into ``error: …`` + exit 1; ``UCE_DEBUG=1`` shows the traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = os.environ.get("UCE_DEBUG", "") not in ("", "0")
        try:
            with warnings_as_lines():
                try:
                    return func(*args, **kwargs)
                except (typer.Exit, typer.Abort, typer.BadParameter):
                    raise
                except Exception as exc:  # after a Ctrl-C: a half-imported module, a swallowed one
                    if interrupted(exc) or is_interrupt(exc):
                        raise KeyboardInterrupt from exc
                    raise
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise  # Typer renders these itself (exit 0/1, or 2 for usage errors)
        except (UceError, RecipeError) as exc:
            if debug:
                traceback.print_exc()
            print_error(str(exc))
            raise typer.Exit(1) from None
        except BrokenPipeError:
            # stdout closed early (e.g. piped into `head`): not an error of the command.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except OSError as exc:
            if exc.errno not in ENVIRONMENT_ERRNOS:  # not the disk's or permissions' fault: a bug
                _internal_error(exc, debug)
            if debug:
                traceback.print_exc()
            where = f" {exc.filename}" if exc.filename else ""
            print_error(
                f"cannot write or read{where}: {exc.strerror} — {ENVIRONMENT_ERRNOS[exc.errno]}"
            )
            raise typer.Exit(1) from None
        except KeyboardInterrupt as exc:  # a long run may say how far it got
            stop_listening()
            if debug:
                traceback.print_exc()
            print_error(str(exc) or "interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if is_interrupt(exc):  # Ctrl-C that pydantic-core wrapped in a SchemaError
                print_error("interrupted")
                raise typer.Exit(130) from None
            _internal_error(exc, debug)

    return wrapper  # type: ignore[return-value]


def _internal_error(exc: Exception, debug: bool) -> NoReturn:
    """A bug, not bad input: still one line, details on request."""
    if debug:
        traceback.print_exc()
    print_error(f"internal error: {type(exc).__name__}: {exc} (set UCE_DEBUG=1 for the traceback)")
    raise typer.Exit(1) from None


def print_json(payload: Any) -> None:
    """One JSON object on stdout."""
    print(json.dumps(payload, indent=2, default=str))
