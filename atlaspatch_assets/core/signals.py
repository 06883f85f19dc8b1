"""Stopping on SIGTERM/SIGINT (what Slurm, `timeout`, `docker stop`, Kubernetes and Ctrl-C send).

Within `stop_on_signals()` either signal raises `StageInterrupted(signum)` in the main thread: the
slide in progress is abandoned where it is (every atomic write removes its temporary on the way
out, and its catalog event is never written), and the caller reports it as interrupted. The last
signal received is kept (`last_signal()`) so a CLI can exit with 128 + signum.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .stages.base import StageInterrupted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {"signum": 0}


def last_signal() -> int:
    """The number of the last stop signal received (0: none)."""
    return _state["signum"]


def reset() -> None:
    _state["signum"] = 0


def exit_code(signum: int) -> int:
    """Shell convention: 128 + signal number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + signum


def _raise(signum: int, frame: Any) -> None:
    _state["signum"] = signum
    raise StageInterrupted(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM/SIGINT raise `StageInterrupted` here (main thread only; handlers restored after).

    A signal that arrived before (recorded by an outer `stop_on_signals`) raises at entry, so a
    stop requested between two slides is honoured before the next one starts.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, _raise)
    try:
        if _state["signum"]:
            raise StageInterrupted(_state["signum"])
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
