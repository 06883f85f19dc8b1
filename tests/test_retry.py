"""Transient I/O errors are retried with exponential backoff; deterministic slide errors are not."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from atlaspatch_assets.core.errors import ReadError, SlideOpenError
from atlaspatch_assets.core.retry import call_with_retries, is_transient, retry_settings
from atlaspatch_assets.core.slide import open_slide


class Flaky:
    """Fails with the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: BaseException):
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_transient_errors_are_retried_with_exponential_backoff() -> None:
    fn = Flaky(TimeoutError("share timed out"), OSError(errno.ESTALE, "Stale file handle"))
    waits: list[float] = []
    t0 = time.monotonic()
    assert call_with_retries(fn, retries=2, delay=0.05, on_retry=lambda n, e, w: waits.append(w)) == "ok"
    assert fn.calls == 3 and waits == [0.05, 0.1]
    assert time.monotonic() - t0 >= 0.15


def test_transient_error_wrapped_in_a_slide_error_is_still_transient() -> None:
    try:
        try:
            raise OSError(errno.ETIMEDOUT, "Connection timed out")
        except OSError as inner:
            raise ReadError("tile read failed") from inner
    except ReadError as e:
        assert is_transient(e)


def test_persistent_transient_error_gives_up_after_the_retries() -> None:
    fn = Flaky(*[ConnectionResetError("reset")] * 5)
    with pytest.raises(ConnectionResetError):
        call_with_retries(fn, retries=2, delay=0.0)
    assert fn.calls == 3


def test_deterministic_errors_fail_at_once(tmp_path: Path) -> None:
    broken = tmp_path / "text.svs"
    broken.write_text("not a slide")
    calls = []

    def open_broken() -> None:
        calls.append(1)
        with open_slide(broken):
            pass

    with pytest.raises(SlideOpenError):
        call_with_retries(open_broken, retries=3, delay=0.0)
    assert len(calls) == 1  # a corrupt file is not retried
    missing = Flaky(FileNotFoundError(errno.ENOENT, "No such file"), PermissionError(errno.EACCES, "denied"))
    with pytest.raises(FileNotFoundError):
        call_with_retries(missing, retries=3, delay=0.0)
    assert missing.calls == 1 and not is_transient(PermissionError(errno.EACCES, "denied"))


def test_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATLASPATCH_IO_RETRIES", raising=False)
    monkeypatch.delenv("ATLASPATCH_IO_RETRY_DELAY", raising=False)
    assert retry_settings() == (2, 1.0)
    monkeypatch.setenv("ATLASPATCH_IO_RETRIES", "4")
    monkeypatch.setenv("ATLASPATCH_IO_RETRY_DELAY", "0.5")
    assert retry_settings() == (4, 0.5)
    monkeypatch.setenv("ATLASPATCH_IO_RETRIES", "many")
    assert retry_settings()[0] == 2
