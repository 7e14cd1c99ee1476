"""The live progress line of a local `gbif-embed run`.

A run over a large download takes hours; without a sign of life people kill
it. This shows what `transforms.common.progress.Listener` hears from the workers:
images processed of the export's image rows, fetched, embedded, failed, the
current rate and an estimate of the time left.

On a terminal one line is redrawn in place; when stdout is a file or a pipe
(CI logs, `nohup`) a plain line is printed now and then instead, because
carriage returns make such logs unreadable. A final line is always printed.
"""
from __future__ import annotations

import collections
import sys
import threading
import time
from typing import Callable, Optional, TextIO

TTY_INTERVAL_S = 0.5
PLAIN_INTERVAL_S = 10.0
RATE_WINDOW_S = 20.0


def done_count(totals: dict) -> int:
    """Image rows past the fetch: on the local runner the rows are written in a
    later stage than they are fetched, so the fetch counts are the live signal
    and the written rows (embeddings, reused ones included, and failures)
    catch up at the end."""
    fetched = int(totals.get("fetched", 0)) + int(totals.get("fetch_failed", 0))
    written = int(totals.get("embeddings", 0)) + int(totals.get("failures", 0))
    # Rows planning finished before the pipeline started (reused, resumed,
    # cached, remembered failures): never fetched nor written by a worker.
    return max(fetched, written) + int(totals.get("planned", 0))


def format_duration(seconds: float) -> str:
    """1:05, 12:00, 3:04:05: short, and sortable by eye."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def eta_seconds(total: int, done: int, rate: Optional[float]) -> Optional[float]:
    """Time left at the current rate, or None when it cannot be known yet."""
    if not rate or rate <= 0 or total <= 0:
        return None
    return max(0, total - done) / rate


def format_line(totals: dict, rate: Optional[float], elapsed: float) -> str:
    """One progress line from the listener's totals.

    The export's image count is the `images` counter: on the local runner the
    export is read to its end before fetching starts, so it is the total by
    the time an estimate makes sense.
    """
    images = int(totals.get("images", 0))
    done = done_count(totals)
    if not images and not done:
        return f"reading the export… ({format_duration(elapsed)})"
    share = f" ({min(done / images, 1):.0%})" if images else ""
    failed = max(int(totals.get("failures", 0)), int(totals.get("fetch_failed", 0)))
    eta = eta_seconds(images, done, rate)
    return (f"{done:,}/{images:,} images{share} · fetched {int(totals.get('fetched', 0)):,}"
            f" · embedded {int(totals.get('embeddings', 0)):,} · failed {failed:,}"
            f" · {f'{rate:.1f}' if rate else '–'} images/s"
            f" · ETA {format_duration(eta) if eta is not None else '–'}"
            f" · {format_duration(elapsed)} elapsed")


class RateMeter:
    """Images per second over the last `window` seconds: recent, yet not jumpy."""

    def __init__(self, window: float = RATE_WINDOW_S):
        self._window = window
        self._samples: collections.deque = collections.deque()

    def add(self, when: float, done: int) -> Optional[float]:
        """Records a sample; returns the rate, or None before anything is done."""
        self._samples.append((when, done))
        while len(self._samples) > 2 and when - self._samples[1][0] >= self._window:
            self._samples.popleft()
        first_when, first_done = self._samples[0]
        if done == 0 or when <= first_when:
            return None
        return (done - first_done) / (when - first_when)


class ProgressDisplay:
    """Prints progress from `totals()` on a thread until the block ends."""

    def __init__(self, totals: Callable[[], dict], stream: Optional[TextIO] = None, *,
                 interval: Optional[float] = None, clock: Callable[[], float] = time.monotonic):
        self._totals = totals
        self._stream = stream or sys.stdout
        self._tty = bool(getattr(self._stream, "isatty", lambda: False)())
        self._interval = interval or (TTY_INTERVAL_S if self._tty else PLAIN_INTERVAL_S)
        self._clock = clock
        self._start = clock()
        self._meter = RateMeter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="progress-display")
        self._last_line = ""
        self._width = 0

    def __enter__(self) -> "ProgressDisplay":
        self._start = self._clock()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.show(final=True)

    def show(self, final: bool = False) -> str:
        """Renders the current line (redrawn on a terminal, appended otherwise)."""
        now = self._clock()
        totals = self._totals()
        done, elapsed = done_count(totals), now - self._start
        rate = self._meter.add(now, done)
        if rate is None and done and elapsed > 0:  # too few samples yet: the average
            rate = done / elapsed
        line = format_line(totals, rate, elapsed)
        if self._tty:
            padding = " " * max(0, self._width - len(line))
            self._stream.write("\r" + line + padding + ("\n" if final else ""))
            self._width = len(line)
        elif final or line != self._last_line:
            self._stream.write(line + "\n")
        self._stream.flush()
        self._last_line = line
        return line

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.show()
            except Exception:  # a display must never break the run
                pass
