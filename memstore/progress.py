"""Progress of long operations: a line redrawn in place on a terminal, silence in logs."""

from __future__ import annotations

import sys
import time


class ByteProgress:
    """Call with (done, total) bytes; draws `label  42% 1.2/2.9 GiB 310 MiB/s` on a TTY only."""

    def __init__(self, label: str, stream=None) -> None:
        self.label = label
        self.stream = stream or sys.stdout
        self.enabled = self.stream.isatty()
        self.started = time.monotonic()
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        rate = done / max(time.monotonic() - self.started, 1e-9)
        self.stream.write(f"\r{self.label} {100 * done / total:5.1f}% {done / 2**30:.2f}/{total / 2**30:.2f} GiB "
                          f"{rate / 2**20:,.0f} MiB/s ")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "ByteProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
