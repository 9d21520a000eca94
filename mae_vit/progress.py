"""A tiny text progress bar (tqdm is not a dependency).

`Progress(total, desc)` redraws one line on stderr with `\\r`: count, percentage, rate and ETA. It is
silent when the stream is not a terminal (log files, CI) unless `enabled=True` forces it, so that
long jobs do not fill logs with carriage returns. Redraws are throttled to `min_interval` seconds.

    with Progress(len(items), "writing") as bar:
        for item in items:
            ...
            bar.update()
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_seconds(seconds: float) -> str:
    """`75.0` -> `'1:15'`, `3725.0` -> `'1:02:05'`."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Single-line progress display; `total=None` shows a count and rate without percentage or ETA."""

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        *,
        enabled: bool | None = None,
        stream: TextIO | None = None,
        min_interval: float = 0.1,
        unit: str = "it",
        width: int = 24,
        initial: int = 0,
    ):
        self.total = total
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.min_interval = min_interval
        self.unit = unit
        self.width = width
        self.initial = initial  # already done before this bar started (a resumed run): not in the rate
        self.count = initial
        self.postfix = ""
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._closed = False

    def update(self, n: int = 1, *, postfix: str | None = None) -> None:
        """Advance by `n`; `postfix` (e.g. `"loss 0.41"`) is shown after the bar until replaced."""
        self.count += n
        if postfix is not None:
            self.postfix = postfix
        now = time.monotonic()
        finished = self.total is not None and self.count >= self.total
        if self.enabled and (finished or now - self._last_draw >= self.min_interval):
            self._draw(now)

    def render(self, now: float | None = None) -> str:
        """The line as it would be drawn now (without the leading carriage return)."""
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.count - self.initial) / elapsed
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            frac = min(self.count / self.total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            eta = (self.total - self.count) / rate if rate > 0 else float("inf")
            eta_text = format_seconds(eta) if eta != float("inf") else "?"
            line = (
                f"{head}{frac * 100:3.0f}% |{bar}| {self.count}/{self.total} "
                f"[{format_seconds(elapsed)}<{eta_text}, {rate:.1f} {self.unit}/s]"
            )
        else:
            line = f"{head}{self.count} [{format_seconds(elapsed)}, {rate:.1f} {self.unit}/s]"
        return f"{line} {self.postfix}" if self.postfix else line

    def eta(self) -> float:
        """Seconds left at the current rate (inf when unknown)."""
        rate = (self.count - self.initial) / max(time.monotonic() - self._start, 1e-9)
        if not self.total or rate <= 0:
            return float("inf")
        return max(self.total - self.count, 0) / rate

    def _draw(self, now: float) -> None:
        self._last_draw = now
        self.stream.write("\r" + self.render(now))
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line (once)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
