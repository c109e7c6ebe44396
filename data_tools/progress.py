"""Progress lines of a long preparation: one within seconds of the start, then one every
couple of seconds on a terminal, sparser in CI logs (the pacing and wording of training's
progress, tf4ctr_dist.progress).

The driver reports once per chunk (local engine: one parsed block of input, megabytes) or per
result block (Ray engine), never per row, and a line is formatted only when one is due, so
tracking costs nothing measurable. A pass's percentage and ETA come from the input bytes read
(text inputs on the local engine) or from the rows read against a row total known up front
(Parquet metadata, the Ray engine's line count of byte-range shards, synthetic rows); without
either a line shows rows and rows/s only.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Literal

from tf4ctr_dist.progress import FIRST_LINE_SECONDS, duration, line_seconds

LINE_SECONDS_TTY = 2.0  # someone is watching: a prepare is often the first thing a new user runs
LINE_SECONDS_LOG = 30.0  # CI logs: a few lines per minute are enough to see it is alive

Unit = Literal["rows", "bytes"]


def _print(line: str) -> None:
    print(line, flush=True)  # flush: in a pipe or CI log the line must not wait for the buffer


class Progress:
    """Progress of the passes of one preparation, printed as lines through `emit`.

    every / first: seconds between lines and before the first one (default by whether stdout is
    a terminal, see tf4ctr_dist.progress.line_seconds); clock: injectable for tests.
    """

    def __init__(
        self,
        emit: Callable[[str], None] = _print,
        *,
        every: float | None = None,
        first: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit = emit
        self.every = every if every is not None else line_seconds(LINE_SECONDS_TTY, LINE_SECONDS_LOG)
        self.clock = clock
        # Not later than the regular gap: on a terminal the first line comes after 2 s, not 5 s.
        self.next_line = clock() + (first if first is not None else min(FIRST_LINE_SECONDS, self.every))
        self.printed = False
        self.start("starting")

    @classmethod
    def silent(cls) -> "Progress":
        """One that never prints (--quiet, and library calls that pass no Progress)."""
        return cls(first=math.inf)

    def start(self, phase: str, total: int | None = None, unit: Unit = "rows") -> None:
        """A new pass, e.g. "pass 1/2: counting vocabularies". total: its input size in `unit`
        (None: unknown, no percentage); unit "bytes": add() gets the bytes read so far."""
        self.phase, self.total, self.unit = phase, total, unit
        self.rows = 0
        self.done = 0
        self.started = self.clock()

    def add(self, rows: int, read_bytes: int | None = None) -> None:
        """`rows` more rows read in this pass; read_bytes: the pass's input bytes read so far
        (unit "bytes"; None leaves the last value). Prints a line when one is due."""
        self.rows += rows
        if self.unit == "rows":
            self.done = self.rows
        elif read_bytes is not None:
            self.done = read_bytes
        now = self.clock()
        if now >= self.next_line:
            self.next_line = now + self.every
            self.printed = True
            self.emit(self.line(now))

    def end(self) -> None:
        """The pass is over: its final line, when any line was printed before (a log that shows
        a run moving also shows where each pass ended; a quick run stays quiet)."""
        if self.printed:
            now = self.clock()
            self.next_line = now + self.every
            self.emit(self.line(now, final=True))

    def line(self, now: float, final: bool = False) -> str:
        """e.g. "prepare: pass 2/2: writing parts: 1,200,000 rows in 3s (400,000 rows/s),
        1.2/4.8 GiB read (25%), ETA 9s"; final: "prepare: ...: done, 4,800,000 rows in 12s (...)"."""
        elapsed = max(now - self.started, 0.0)
        rate = self.rows / elapsed if elapsed > 0 else 0.0
        text = f"prepare: {self.phase}: {'done, ' if final else ''}{self.rows:,} rows in {duration(elapsed)} ({rate:,.0f} rows/s)"
        if final or not self.total:
            return text
        fraction = min(self.done / self.total, 1.0)
        percent = int(fraction * 100)  # floor: 100% only when everything was read
        if self.unit == "bytes":
            scale, name = _bytes_unit(self.total)
            text += f", {self.done / scale:.1f}/{self.total / scale:.1f} {name} read ({percent}%)"
        else:
            text += f", {percent}% of {self.total:,} rows"
        if fraction > 0:
            text += f", ETA {duration(elapsed * (1 - fraction) / fraction)}"
        return text


def _bytes_unit(n: int) -> tuple[int, str]:
    """The binary unit that shows `n` with one to four digits before the point."""
    for power, name in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if n >= 1 << (10 * power):
            return 1 << (10 * power), name
    return 1, "B"
