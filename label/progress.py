"""How far a labelling run is: images done, images/s and time left, on stderr.

On a terminal one bar is redrawn in place; otherwise (a log file, CI) a `Progress` line is written
at most every `interval` seconds, so logs stay short on long jobs.
"""

from __future__ import annotations

import sys
import time

from flonnx.runtime.staging import Progress

BAR_WIDTH = 24


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


class Meter:
    def __init__(self, total: int, progress: Progress, interval: float = 5.0):
        self.total = total
        self.done = 0
        self.progress = progress
        self.interval = interval
        self.start = time.perf_counter()
        self._shown = self.start
        stream = progress.stream if progress.stream is not None else sys.stderr
        self._bar = not progress.quiet and hasattr(stream, "isatty") and stream.isatty()
        self._stream = stream

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        left = self.total - self.done
        eta = duration(left / rate) if rate > 0 else "?"
        percent = 100 * self.done / self.total if self.total else 100.0
        return f"{self.done}/{self.total} images ({percent:.0f}%), {rate:.2f} images/s, ETA {eta}"

    def update(self, count: int) -> None:
        if not count:
            return
        self.done += count
        now = time.perf_counter()
        if self._bar:
            filled = BAR_WIDTH * self.done // max(self.total, 1)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            print(f"\r[{bar}] {self.line()}\033[K", end="", file=self._stream, flush=True)
        elif now - self._shown >= self.interval and self.done < self.total:
            self._shown = now
            self.progress(f"labelled {self.line()}")

    def finish(self) -> None:
        if self._bar:
            print(file=self._stream, flush=True)
        self.progress(f"labelled {self.line().split(', ETA')[0]}")
