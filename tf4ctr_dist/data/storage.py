"""fsspec locations (local paths, file://, s3://) with credential-free error messages."""

from __future__ import annotations

import os
import posixpath
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import fsspec
from fsspec.spec import AbstractFileSystem

from .errors import DataError

T = TypeVar("T")
RETRY_ENV = "TF4CTR_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0

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
# user-info before the host: scheme://USER@ or scheme://USER:SECRET@, at the start of a URL or
# of a chained one (simplecache::s3://...). The secret may hold "/" (AWS secret keys do); a
# "host:port/..." is not taken for one.
_USERINFO = re.compile(r"(?<![a-zA-Z0-9+.-])([a-zA-Z][a-zA-Z0-9+.-]*://)"
                       r"(?:[^/@\s:]*:(?!\d*(?:[/?#\s]|$))[^@\s]*|[^/@\s:]*)@")
# secrets in a query string (pre-signed URLs, tokens)
_QUERY_SECRET = re.compile(r"([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|signature|sig|token|"
                           r"access_token|awsaccesskeyid|key|secret)=)[^&#\s]*", re.IGNORECASE)


_DRIVE = re.compile(r"^[a-zA-Z]:")


def relative_problem(rel: Any) -> str | None:
    """Why `rel` is not a path that stays below a dataset's root (None when it is): manifests
    come with the data, so an absolute path, `..`, a URL or another bucket would otherwise make
    the job read whatever its credentials reach."""
    if not isinstance(rel, str) or not rel:
        return "expected a non-empty relative path"
    if "://" in rel or rel.startswith(("/", "~")) or _DRIVE.match(rel):
        return "absolute paths and URLs are not allowed (paths are relative to the dataset root)"
    if "\\" in rel or any(ord(c) < 32 for c in rel):
        return "backslashes and control characters are not allowed"
    if any(seg in ("", ".", "..") for seg in rel.split("/")):
        return "empty, '.' and '..' path segments are not allowed"
    return None


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
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


def refuse_credentials(url: Any, what: str = "URL") -> None:
    """DataError when `url` carries user-info (http://user:secret@host, s3://KEY:SECRET@bucket):
    such a URL would travel into config.json, result.json, checkpoints, logs and messages."""
    if has_credentials(url):
        raise DataError(credentials_message(str(url), what))


def credentials_message(url: str, what: str = "URL") -> str:
    return (
        f"{what} {display_url(url)} carries credentials (user:password@ before the host, or a signature "
        "or token in its query string); they would be "
        "written into config, result and checkpoint files and logs. Remove them from the URL and give "
        "them through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ...) "
        "or storage_options"
    )


def has_credentials(url: Any) -> bool:
    text = str(url) if isinstance(url, (str, os.PathLike)) else ""
    return bool(_USERINFO.search(text) or _QUERY_SECRET.search(text))


def display_url(url: str) -> str:
    """The URL with any user:password@ part and query-string secret removed, safe for messages
    and manifests."""
    return _QUERY_SECRET.sub(r"\1***", _USERINFO.sub(r"\1", url))


def describe(exc: BaseException, storage_options: Mapping[str, Any] | None = None) -> str:
    """`ExcType: message` with credentials removed."""
    message = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {redact(message, storage_options)}"


class StorageUnavailable(ConnectionError):
    """Object storage stayed unreachable (refused connections, timeouts, 5xx, throttling) for
    the whole retry window. Not a DataError: the data may be fine, and a restart later may
    succeed, so Ray Train's max_failures applies to it."""


# S3 error codes that mean "try again later" (throttling and server-side trouble).
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
    "RequestTimeout", "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError", "503", "500", "502", "504",
}


def transient_cause(exc: BaseException) -> str | None:
    """A short name of the transient storage trouble behind `exc` ("connection refused",
    "timeout", "HTTP 503 SlowDown", ...) or None when retrying cannot help (a missing object,
    denied access, a data or configuration error). Follows __cause__/__context__ because s3fs
    and botocore wrap the socket error a few levels deep."""
    import asyncio
    import socket

    if isinstance(exc, (DataError, FileNotFoundError, PermissionError, StorageUnavailable)):
        return None
    seen: set[int] = set()
    found: str | None = None
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (FileNotFoundError, PermissionError, DataError)):
            return None
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"  # the most specific name wins
        if isinstance(e, ConnectionResetError):
            found = found or "connection reset"
        elif isinstance(e, (TimeoutError, socket.timeout, asyncio.TimeoutError)):
            found = found or "timeout"
        elif isinstance(e, ConnectionError):
            found = found or "connection failed"
        else:
            kind = type(e).__name__
            response = getattr(e, "response", None)
            if isinstance(response, Mapping):  # botocore ClientError
                code = str(response.get("Error", {}).get("Code", ""))
                status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500):
                    found = found or f"HTTP {status} {code}".strip()
                else:
                    return None  # NoSuchKey, AccessDenied, NoSuchBucket, ...
            elif "Timeout" in kind:  # botocore Connect/ReadTimeoutError, fsspec FSTimeoutError
                found = found or "timeout"
            elif kind in ("EndpointConnectionError", "ConnectionClosedError", "HTTPClientError",
                          "ClientConnectorError", "ServerDisconnectedError", "ClientPayloadError",
                          "IncompleteRead", "ResponseParserError"):
                found = found or "connection failed"
        todo += [e.__cause__, e.__context__]
        # DCP's CheckpointException: {rank: (exception, traceback)}
        failures = getattr(e, "failures", None)
        if isinstance(failures, Mapping):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return found


def retry_window(seconds: float | None = None) -> float:
    """The retry window in seconds: `seconds` when given, else $TF4CTR_STORAGE_RETRY_SECONDS,
    else DEFAULT_RETRY_SECONDS (0 disables retrying)."""
    if seconds is None:
        raw = os.environ.get(RETRY_ENV, "").strip()
        try:
            seconds = float(raw) if raw else DEFAULT_RETRY_SECONDS
        except ValueError:
            raise DataError(f"${RETRY_ENV}={raw!r}: expected a number of seconds") from None
    if not seconds >= 0:
        raise DataError(f"storage retry window must be >= 0 seconds, got {seconds}")
    return float(seconds)


def with_retries(fn: Callable[[], T], what: str, window_s: float | None = None, *,
                 storage_options: Mapping[str, Any] | None = None,
                 agree: Callable[[bool], bool] | None = None) -> T:
    """fn(), retried with jittered exponential backoff (0.5 s doubling to 10 s) while it fails
    with a transient storage error (see `transient_cause`) and `window_s` seconds have not
    passed since the first failure. Other errors propagate at once. When the window is spent:
    StorageUnavailable("cannot reach WHAT (CAUSE for N s)").

    fn must be idempotent (a read, or a whole-object write). `agree` (collective calls): given
    this rank's wish to retry, returns whether every rank retries, so all ranks try again or
    all give up together."""
    window = retry_window(window_s)
    first: float | None = None  # start of the first failed attempt
    delay = 0.5
    while True:
        attempt = time.monotonic()
        try:
            return fn()
        except Exception as exc:
            cause = transient_cause(exc)
            now = time.monotonic()
            first = attempt if first is None else first
            retry = cause is not None and now - first < window
            if agree is not None:
                retry = agree(retry)
            if not retry:
                if cause is None:
                    raise
                raise StorageUnavailable(
                    redact(f"cannot reach {what} ({cause} for {now - first:.0f} s; retry window {window:g} s, "
                           f"${RETRY_ENV} or data.storage_retry_seconds): {describe(exc, storage_options)}",
                           storage_options)
                ) from None
            time.sleep(min(delay, max(0.0, first + window - now)) * random.uniform(0.8, 1.0) if window else 0)
            delay = min(delay * 2, 10.0)


@dataclass(frozen=True)
class Location:
    """A root URL resolved to a filesystem and a path inside it."""

    url: str  # as given by the user, minus credentials
    fs: AbstractFileSystem
    root: str  # path in `fs` terms (no protocol for s3: "bucket/prefix")
    storage_options: Mapping[str, Any]
    retry_seconds: float = DEFAULT_RETRY_SECONDS  # window for transient storage errors

    def retry(self, fn: Callable[[], T], what: str) -> T:
        """fn() with retries of transient storage errors (see `with_retries`)."""
        return with_retries(fn, what, self.retry_seconds, storage_options=self.storage_options)

    def path(self, *rel: str) -> str:
        """Filesystem path of a file below the root (DataError for a path that would leave it)."""
        for r in rel:
            why = relative_problem(r)
            if why is not None:
                raise DataError(f"{self.url}: refusing path {r!r}: {why}")
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


def resolve(url: str, storage_options: Mapping[str, Any] | None = None,
            retry_seconds: float | None = None) -> Location:
    """Resolve `url` (local path, file://, s3://, ...) with fsspec; a clear DataError if unusable.
    retry_seconds: how long reads and writes through the Location ride out transient storage
    errors (None: $TF4CTR_STORAGE_RETRY_SECONDS or 300)."""
    window = retry_window(retry_seconds)
    options = dict(storage_options or {})
    if not isinstance(url, (str, os.PathLike)) or not str(url).strip():
        raise DataError(f"bad URL {url!r}: expected a local path or a URL such as s3://bucket/prefix")
    url = str(url)
    refuse_credentials(url)
    shown = display_url(url)
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except Exception as exc:  # unknown protocol, missing driver, bad option
        raise DataError(
            redact(f"bad URL {shown}: cannot open its filesystem ({describe(exc, options)})", options)
        ) from None
    return Location(url=shown, fs=fs, root=root.rstrip("/") or root, storage_options=options, retry_seconds=window)
