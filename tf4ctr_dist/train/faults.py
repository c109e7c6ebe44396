"""Deliberate worker crashes, for fault-tolerance tests and drills.

``TF4CTR_FAULTS="step@1:5:1,checkpoint@2:0:0"`` kills (SIGKILL, no clean-up) rank R when it
reaches POINT at epoch E (1-based) and step S:

    step        right after training batch S of epoch E
    checkpoint  while writing the checkpoint taken at (E, S): this rank's files are written,
                the checkpoint is not committed yet (S = 0: the epoch-end checkpoint of epoch E)

Each fault fires once: before killing itself the process creates a marker file in
``TF4CTR_FAULTS_DIR`` (required), so the restarted worker passes the same point.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

ENV = "TF4CTR_FAULTS"
MARKERS_ENV = "TF4CTR_FAULTS_DIR"
POINTS = ("step", "checkpoint")


def parse(spec: str) -> list[tuple[str, int, int, int]]:
    """"point@E:S:R,..." -> [(point, epoch, step, rank)]."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, where = item.partition("@")
        parts = where.split(":")
        if point not in POINTS or len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{ENV}: {item!r} is not POINT@EPOCH:STEP:RANK with POINT in {POINTS}")
        faults.append((point, int(parts[0]), int(parts[1]), int(parts[2])))
    return faults


def maybe_crash(point: str, epoch: int, step: int, rank: int, environ: Optional[dict] = None) -> None:
    """Kill this process if a fault is armed for (point, epoch (1-based), step, rank)."""
    env = os.environ if environ is None else environ
    spec = env.get(ENV)
    if not spec:
        return
    for fault in parse(spec):
        if fault != (point, epoch, step, rank):
            continue
        markers = env.get(MARKERS_ENV)
        if not markers:
            raise ValueError(f"{ENV} needs {MARKERS_ENV} (a folder that remembers which faults fired)")
        os.makedirs(markers, exist_ok=True)
        try:
            fd = os.open(os.path.join(markers, f"{point}@{epoch}:{step}:{rank}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue  # already fired before a restart
        os.close(fd)
        print(f"[tf4ctr] fault injection: killing rank {rank} at {point} epoch {epoch} step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
