"""Progress lines of a long phase without a terminal: at least every 30 s and every 10 %, with the time left."""

from __future__ import annotations

import logging

import pytest

from ssl_kvasir import progress
from ssl_kvasir.progress import Progress


class Clock:
    """time.monotonic under the test's control."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    return clock


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ssl_kvasir"]


def test_a_line_every_ten_percent_with_the_time_left(clock, caplog) -> None:
    """1,000 images in batches of 25 at 100 images/s (without a terminal): a line at each 10 % reached."""
    with caplog.at_level(logging.INFO, logger="ssl_kvasir"), Progress("embedding", 1000) as bar:
        for _ in range(40):
            clock.now += 0.25
            bar.advance(25)
    lines = _lines(caplog)
    assert len(lines) == 9  # 10 % .. 90 %; the end is the caller's own line
    assert lines[0] == "embedding: 100 of 1,000 images (10 %), 100 images/s, about 9 s left"
    assert lines[-1] == "embedding: 900 of 1,000 images (90 %), 100 images/s, about 1 s left"


def test_a_line_every_30_seconds_of_a_slow_phase(clock, caplog) -> None:
    """110,079 images at 274 images/s, batches of 128 (the full archive's embedding, 6.7 minutes): a line at
    least every 30 s, though 10 % takes 40 s."""
    with caplog.at_level(logging.INFO, logger="ssl_kvasir"), Progress("embedding", 110_079) as bar:
        last, gaps = clock.now, []
        for done in range(0, 110_079, 128):
            clock.now += 128 / 274
            bar.advance(min(128, 110_079 - done))
            if len(_lines(caplog)) > len(gaps):
                gaps.append(clock.now - last)
                last = clock.now
    assert max(gaps) <= 30.5
    assert len(gaps) >= 13  # 402 s / 30 s
    assert _lines(caplog)[0].endswith("274 images/s, about 6 min 11 s left")


def test_disabled_reports_nothing_and_a_closing_line_on_request(clock, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="ssl_kvasir"):
        with Progress("checking", 100, enabled=False) as bar:
            clock.now += 60
            bar.advance(100)
        assert _lines(caplog) == []
        with Progress("evaluating", 100, closing_line=True) as bar:
            clock.now += 2
            bar.advance(100)
    assert _lines(caplog) == ["evaluating: 100 images in 2.0 s (50 images/s)"]
