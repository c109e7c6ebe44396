"""The run folder (local path or fsspec URL): config, plan, per-epoch metrics, result.

Writes go to a temporary name first and are then moved into place, so a reader never sees a
half-written file. Only one process (rank 0) writes; others get a disabled RunDir.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import Any

import fsspec

SECRET_KEYS = ("key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key")


def redact(obj: Any) -> Any:
    """Drop anything that looks like a credential before it reaches disk or logs."""
    if isinstance(obj, dict):
        return {
            k: ("<redacted>" if any(s in str(k).lower() for s in SECRET_KEYS) else redact(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None: the run files are strict JSON (a bare NaN is
    rejected by most JSON parsers) and an undefined metric reads as null, not as a number."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def _dumps(obj: Any, **kw: Any) -> str:
    return json.dumps(finite(redact(obj)), allow_nan=False, default=str, **kw)


class RunDir:
    def __init__(self, url: str, enabled: bool = True) -> None:
        self.url = url.rstrip("/")
        self.enabled = enabled
        if enabled:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
            self.fs.makedirs(self.root, exist_ok=True)

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def write_text(self, name: str, text: str) -> None:
        if not self.enabled:
            return
        final = self.path(name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open(tmp, "w") as f:
            f.write(text)
        self.fs.mv(tmp, final)

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, _dumps(obj, indent=2, sort_keys=False) + "\n")

    def write_jsonl(self, name: str, records: list) -> None:
        self.write_text(name, "".join(_dumps(r) + "\n" for r in records))

    def append_jsonl(self, name: str, obj: Any) -> None:
        """Rewrites the whole file (object stores cannot append); files here stay small."""
        if not self.enabled:
            return
        final = self.path(name)
        old = self.fs.cat_file(final).decode() if self.fs.exists(final) else ""
        self.write_text(name, old + _dumps(obj) + "\n")
