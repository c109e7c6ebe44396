"""The run folder (local path or fsspec URL): config, plan, per-epoch metrics, result.

Writes go to a temporary name first and are then moved into place, so a reader never sees a
half-written file. Only one process (rank 0) writes; others get a disabled RunDir.
"""

from __future__ import annotations

import json
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
        self.write_text(name, json.dumps(redact(obj), indent=2, sort_keys=False, default=str) + "\n")

    def write_jsonl(self, name: str, records: list) -> None:
        self.write_text(name, "".join(json.dumps(redact(r), default=str) + "\n" for r in records))

    def append_jsonl(self, name: str, obj: Any) -> None:
        """Rewrites the whole file (object stores cannot append); files here stay small."""
        if not self.enabled:
            return
        final = self.path(name)
        old = self.fs.cat_file(final).decode() if self.fs.exists(final) else ""
        self.write_text(name, old + json.dumps(redact(obj), default=str) + "\n")
