"""The reliability suite's report: each test adds its counts; the table is printed at the end of the
session and written to test-artifacts/reliability.txt (what the issue note quotes)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACT = REPO / "test-artifacts" / "reliability.txt"
_ROWS: list[tuple[str, str, str]] = []


class Report:
    """`report.add(area, what, value)`; `report.table(title, rows)` prints a small table (-s)."""

    def add(self, area: str, what: str, value: object) -> None:
        _ROWS.append((area, what, str(value)))

    def table(self, title: str, header: tuple[str, ...], rows: list[tuple[object, ...]]) -> None:
        cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
        widths = [min(48, max(len(r[i]) for r in cells)) for i in range(len(header))]
        print(f"\n{title}")
        for j, r in enumerate(cells):
            print("  " + "  ".join(c[:w].ljust(w) for c, w in zip(r, widths, strict=True)))
            if j == 0:
                print("  " + "  ".join("-" * w for w in widths))


@pytest.fixture
def report() -> Report:
    return Report()


def render() -> str:
    if not _ROWS:
        return ""
    w0 = max(len(a) for a, _, _ in _ROWS)
    w1 = max(len(b) for _, b, _ in _ROWS)
    lines = ["reliability suite: counts", f"{'area'.ljust(w0)}  {'what'.ljust(w1)}  value", "-" * (w0 + w1 + 12)]
    lines += [f"{a.ljust(w0)}  {b.ljust(w1)}  {v}" for a, b, v in _ROWS]
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    text = render()
    if not text:
        return
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(text)
    terminalreporter.write_sep("-", "reliability counts")
    terminalreporter.write(text)


@pytest.fixture(scope="session")
def mid_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16000x12000 40x slide of real tissue islands (~240 patches of 224 px at 20x): big enough to
    be in the middle of feature extraction when a test signals the process."""
    import subprocess
    import sys

    from .corpus import MAKE_TEST_SLIDE

    path = tmp_path_factory.mktemp("mid") / "mid.svs"
    subprocess.run(
        [sys.executable, str(MAKE_TEST_SLIDE), str(path), "--width", "16000", "--height", "12000"]
        + ["--mag", "40", "--tissue", "0.5"],
        check=True,
        capture_output=True,
        timeout=600,
    )
    return path


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1024x768 aperio-like slide of real H&E pixels (20x, ~10 patches of 224 px): cheap to process."""
    from .corpus import small_tissue_slide

    return small_tissue_slide(tmp_path_factory.mktemp("small") / "small.svs")
