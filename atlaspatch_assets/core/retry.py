"""Retry of transient I/O errors (network shares, busy or stale files) with exponential backoff.

A slide's work is retried only when the error, or one in its cause chain, is transient: timeouts,
connection errors, lock timeouts and OSErrors whose errno means "try again" (EAGAIN, EBUSY,
ESTALE, ETIMEDOUT, network down, ...). Everything else — corrupt files, missing metadata, bad
geometry — is deterministic and fails at once.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

RETRIES_ENV = "ATLASPATCH_IO_RETRIES"
DELAY_ENV = "ATLASPATCH_IO_RETRY_DELAY"
DEFAULT_RETRIES = 2
DEFAULT_DELAY = 1.0

TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EAGAIN",
        "EBUSY",
        "EINTR",
        "ESTALE",
        "ETIMEDOUT",
        "ENETDOWN",
        "ENETUNREACH",
        "ENETRESET",
        "EHOSTDOWN",
        "EHOSTUNREACH",
        "ECONNABORTED",
        "ECONNRESET",
        "ECONNREFUSED",
        "ENOLCK",
        "EREMOTEIO",
        "ECOMM",
    )
    if hasattr(errno, name)
)


def is_transient(exc: BaseException) -> bool:
    """True when `exc` or an exception in its cause/context chain is a transient I/O error."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (TimeoutError, ConnectionError, BlockingIOError, InterruptedError)):
            return True
        if type(e).__name__ == "Timeout" and type(e).__module__.startswith("filelock"):
            return True  # another process holds the slide's lock for too long
        if isinstance(e, OSError) and e.errno in TRANSIENT_ERRNOS:
            return True
        e = e.__cause__ or e.__context__
    return False


def retry_settings() -> tuple[int, float]:
    """($ATLASPATCH_IO_RETRIES, $ATLASPATCH_IO_RETRY_DELAY seconds), defaults (2, 1.0)."""
    try:
        retries = max(0, int(os.environ.get(RETRIES_ENV, DEFAULT_RETRIES)))
    except ValueError:
        retries = DEFAULT_RETRIES
    try:
        delay = max(0.0, float(os.environ.get(DELAY_ENV, DEFAULT_DELAY)))
    except ValueError:
        delay = DEFAULT_DELAY
    return retries, delay


def call_with_retries(
    fn: Callable[[], T],
    *,
    retries: int | None = None,
    delay: float | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Call `fn`; on a transient error wait delay·2^k and try again, at most `retries` more times.

    `on_retry(attempt, error, wait_seconds)` is called before each wait (for logs). The last
    error, or any non-transient one, propagates unchanged.
    """
    default_retries, default_delay = retry_settings()
    retries = default_retries if retries is None else retries
    delay = default_delay if delay is None else delay
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as e:
            if attempt >= retries or not is_transient(e):
                raise
            wait = delay * (2**attempt)
            attempt += 1
            if on_retry is not None:
                on_retry(attempt, e, wait)
            time.sleep(wait)
