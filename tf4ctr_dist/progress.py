"""Pacing and wording of progress lines, shared by training (tf4ctr_dist.train.loop) and dataset
preparation (data_tools.progress).

Standard library only: data_tools may import it (tests/unit/test_import_direction.py) without
pulling in torch.
"""

from __future__ import annotations

import sys
from typing import TextIO

FIRST_LINE_SECONDS = 5.0  # a new user sees a long job moving within its first seconds


def line_seconds(tty_seconds: float, log_seconds: float, stream: TextIO | None = None) -> float:
    """Seconds between progress lines: `tty_seconds` when `stream` (default stdout) is a
    terminal, where someone is watching; `log_seconds` otherwise, so CI logs stay short."""
    stream = stream if stream is not None else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stream: treat as a log
        tty = False
    return tty_seconds if tty else log_seconds


def duration(seconds: float) -> str:
    """4s, 1m15s, 1h02m: short enough for a progress line, precise enough for an ETA."""
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"
