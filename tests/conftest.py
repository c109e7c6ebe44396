"""Shared pytest fixtures. Keep this file small: put fixture code in its own module and import it."""

from tests.s3server import s3_server  # noqa: F401  (session-scoped local S3 server)
