"""Progress lines for long loops that read well in Jupyter, in papermill's log and in a CI log.

A core module (the decode perplexity in `kvshare.metrics`) and the notebooks' experiments both print through
`Progress`; it lives in the core so that the core never has to import notebook logic (`kvshare.experiments`).
"""

from __future__ import annotations

import sys
import time


class Progress:
    """Counts steps of a long loop and prints one line at most every `every` seconds (and at the end)."""

    def __init__(self, total: int, desc: str, every: float = 10.0, enabled: bool = True, stream=None):
        self.total, self.desc, self.every, self.enabled = total, desc, every, enabled
        self.stream = stream or sys.stdout
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        if enabled:
            self._print("started")

    def _print(self, note: str = ""):
        elapsed = time.perf_counter() - self.t0
        eta = ""
        if 0 < self.done < self.total:
            eta = f", ~{format_seconds(elapsed / self.done * (self.total - self.done))} left"
        print(
            f"{self.desc}: {self.done}/{self.total} ({format_seconds(elapsed)}{eta}){' ' + note if note else ''}",
            file=self.stream,
            flush=True,
        )

    def update(self, n: int = 1, note: str = ""):
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.every or self.done >= self.total):
            self.last = now
            self._print(note)

    def close(self):
        if self.enabled and self.done < self.total:
            self._print("stopped")


def format_seconds(seconds: float) -> str:
    """`42s` below a minute, `3m05s` above."""
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
