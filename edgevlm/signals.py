"""SIGTERM handled as Ctrl-C is, so a terminated command cleans its partial output up (`edgevlm`, the demo recipe)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def sigterm_as_interrupt() -> Iterator[list[int]]:
    """While inside, SIGTERM raises KeyboardInterrupt, so `finally:` blocks remove partial output as on Ctrl-C;
    a second one ends the process at once. Yields a list that holds the signal once one came (to tell
    "terminated" from "interrupted"). Only the main thread may set handlers: in another this changes nothing."""
    terminated: list[int] = []

    def on_sigterm(signum, frame):
        terminated.append(signum)
        signal.signal(signum, signal.SIG_DFL)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield terminated
        return
    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield terminated
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
