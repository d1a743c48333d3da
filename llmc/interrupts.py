"""Ctrl-C for the CLI and for clean-up that must finish (main thread only; elsewhere a no-op)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interrupts_ignored() -> Iterator[None]:
    """Ctrl-C is ignored inside: a second one, pressed while the first is being cleaned up
    after, must not leave half a directory behind."""
    if not _main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class CtrlC:
    """Ctrl-C as the CLI sees it. It remembers a press, because some code turns the
    KeyboardInterrupt into its own error: a C extension whose import it cuts short raises
    ImportError. Once the CLI exits for one, further presses are ignored, so that the clean-up
    and the exit finish (a press during interpreter shutdown kills the process by signal
    instead of exit code 130)."""

    def __init__(self):
        self.seen = False
        self._previous = signal.signal(signal.SIGINT, self._pressed) if _main_thread() else None

    def _pressed(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def exiting(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self._previous = None

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
