"""A local S3-compatible server (moto, server mode) for tests that read or write s3:// URLs.

Use the session-scoped `s3_server` fixture (registered in tests/conftest.py):

    def test_x(s3_server):
        url = f"s3://{s3_server.bucket}/my/prefix"
        prepare_...(..., storage_options=s3_server.storage_options)

Subprocesses (Ray workers, CLIs) can use `s3_server.env` or the AWS_* variables it sets.
Outside pytest (benchmarks): `with local_s3_server(bucket) as server: ...`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import pytest

from tf4ctr_dist.distributed.spawn import free_port

ACCESS_KEY = "tf4ctr-test-key-AKIA0000"
SECRET_KEY = "tf4ctr-test-secret-do-not-leak-5f1c"  # distinctive, so tests can assert it never leaks


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    storage_options: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])


def storage_options_for(endpoint_url: str, *, connect_timeout: float = 5, attempts: int = 2) -> dict[str, Any]:
    """fsspec/s3fs options for an endpoint, with short timeouts so failures are quick."""
    return {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
        "config_kwargs": {
            "connect_timeout": connect_timeout,
            "read_timeout": 30,
            "retries": {"max_attempts": attempts, "mode": "standard"},
        },
    }


def create_bucket(endpoint_url: str, bucket: str) -> None:
    # botocore directly: s3fs.mkdir would send a us-east-1 LocationConstraint, which S3 rejects.
    import botocore.session

    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint_url,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )
    client.create_bucket(Bucket=bucket)


@contextlib.contextmanager
def local_s3_server(bucket: str = "tf4ctr-test", *, set_env: bool = True) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 (threads of this process) with one empty bucket.

    set_env: export its AWS_* variables (credentials and endpoint) while it runs, for child
    processes and code that reads the environment. Shared by the tests (the `s3_server`
    fixture) and the benchmarks (benchmarks/prepare.py).
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    saved = {name: os.environ.get(name) for name in env}
    if set_env:
        os.environ.update(env)
    try:
        create_bucket(endpoint, bucket)
        yield S3Server(endpoint_url=endpoint, bucket=bucket, storage_options=storage_options_for(endpoint), env=env)
    finally:
        server.stop()
        if set_env:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    pytest.importorskip("moto.server", reason="moto[server] is not installed")
    pytest.importorskip("s3fs")
    with local_s3_server() as server:
        yield server
