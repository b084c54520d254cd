"""Ctrl-C: remember that SIGINT reached the process, so the errors it causes later read as one.

A KeyboardInterrupt that lands inside an import leaves that module half-initialised; the next
import of it then fails with an ImportError (numpy: "cannot load module more than once per
process"), a ModuleNotFoundError, or a library's own wrapping of one (diffusers' lazy modules),
and some libraries swallow the KeyboardInterrupt itself on the way. Each of those is the
interruption, not a bug: ``interrupted(exc)`` says so, and the CLI reports ``error: interrupted``
with exit code 130 at any moment. Nothing here imports anything heavy.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

_received = False
_reported = False


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    """Python's own behaviour (raise KeyboardInterrupt), remembering that it happened."""
    global _received
    _received = True
    raise KeyboardInterrupt


def watch_sigint() -> None:
    """Install the remembering handler in place of Python's default one (main thread only).

    Called by the ``uce`` program's entry points, never on import: a process that only imports
    uce keeps its own Ctrl-C handling.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def interrupted(exc: BaseException | None = None) -> bool:
    """True when SIGINT has reached this process, or ``exc`` was raised while handling a
    KeyboardInterrupt (its context or cause chain holds one)."""
    if _received:
        return True
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def stop_listening() -> bool:
    """Ignore further Ctrl-C while the process reports the interruption and exits.

    Returns:
        True the first time (nobody has reported the interruption yet), False after.
    """
    global _reported
    first, _reported = not _reported, True
    # only in the uce program (its handler in place): a caller's own process keeps its Ctrl-C
    if (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGINT) is _on_sigint
    ):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return first
