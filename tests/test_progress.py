"""Progress lines: drawn in place on a terminal, silent when output goes to a log.

Run: python -m pytest tests/test_progress.py -q
"""

from __future__ import annotations

import io

from memstore.progress import ByteProgress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_draws_in_place_on_a_terminal():
    out = Terminal()
    p = ByteProgress("checkpoint s", stream=out)
    p(1 << 29, 1 << 30)
    p(1 << 30, 1 << 30)
    p.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and " 50.0% 0.50/1.00 GiB" in text and "100.0%" in text and text.endswith("\n")


def test_silent_in_logs():
    out = io.StringIO()
    p = ByteProgress("restore s", stream=out)
    p(5, 10)
    p.close()
    assert out.getvalue() == ""
