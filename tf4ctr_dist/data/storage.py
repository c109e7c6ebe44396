"""fsspec locations (local paths, file://, s3://) with credential-free error messages."""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
from fsspec.spec import AbstractFileSystem

from .errors import DataError

# storage_options keys (at any nesting depth) whose values are credentials.
_SECRET_KEYS = {
    "key",
    "secret",
    "token",
    "password",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "session_token",
    "access_key",
    "secret_key",
}
_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@")


def _secret_values(options: Any) -> list[str]:
    found: list[str] = []
    if isinstance(options, Mapping):
        for name, value in options.items():
            if isinstance(value, str) and str(name).lower() in _SECRET_KEYS and value:
                found.append(value)
            else:
                found.extend(_secret_values(value))
    elif isinstance(options, (list, tuple)):
        for value in options:
            found.extend(_secret_values(value))
    return found


def redact(text: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Remove credentials (from storage_options, AWS env vars, URL user-info) from `text`."""
    secrets = _secret_values(storage_options or {})
    secrets += [os.environ[name] for name in _SECRET_ENV if os.environ.get(name)]
    # Longest first so a secret containing another secret is removed whole.
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 3:  # replacing 1-2 character "secrets" would mangle the message
            text = text.replace(secret, "***")
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@", r"\1***@", text)


def display_url(url: str) -> str:
    """The URL with any user:password@ part removed, safe for messages and manifests."""
    return _USERINFO.sub(r"\1", url)


def describe(exc: BaseException, storage_options: Mapping[str, Any] | None = None) -> str:
    """`ExcType: message` with credentials removed."""
    message = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {redact(message, storage_options)}"


@dataclass(frozen=True)
class Location:
    """A root URL resolved to a filesystem and a path inside it."""

    url: str  # as given by the user, minus credentials
    fs: AbstractFileSystem
    root: str  # path in `fs` terms (no protocol for s3: "bucket/prefix")
    storage_options: Mapping[str, Any]

    def path(self, *rel: str) -> str:
        """Filesystem path of a file below the root."""
        return posixpath.join(self.root, *rel) if rel else self.root

    def url_of(self, *rel: str) -> str:
        """User-facing URL of a file below the root (for messages)."""
        return posixpath.join(self.url.rstrip("/"), *rel) if rel else self.url

    @property
    def is_local(self) -> bool:
        protocol = self.fs.protocol
        return bool({"file", "local"} & set((protocol,) if isinstance(protocol, str) else protocol))

    def makedirs(self, path: str) -> None:
        """Create a folder on local filesystems; a no-op on object stores, where a "mkdir" of a
        missing bucket would silently create the bucket."""
        if self.is_local:
            self.fs.makedirs(path, exist_ok=True)

    def error(self, message: str, exc: BaseException | None = None) -> DataError:
        """A DataError whose text (and cause) cannot leak credentials."""
        if exc is not None:
            message = f"{message} ({describe(exc, self.storage_options)})"
        return DataError(redact(message, self.storage_options))


def resolve(url: str, storage_options: Mapping[str, Any] | None = None) -> Location:
    """Resolve `url` (local path, file://, s3://, ...) with fsspec; a clear DataError if unusable."""
    options = dict(storage_options or {})
    if not isinstance(url, (str, os.PathLike)) or not str(url).strip():
        raise DataError(f"bad URL {url!r}: expected a local path or a URL such as s3://bucket/prefix")
    url = str(url)
    shown = display_url(url)
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except Exception as exc:  # unknown protocol, missing driver, bad option
        raise DataError(
            redact(f"bad URL {shown}: cannot open its filesystem ({describe(exc, options)})", options)
        ) from None
    return Location(url=shown, fs=fs, root=root.rstrip("/") or root, storage_options=options)
