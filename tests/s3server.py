"""A real S3 HTTP endpoint for tests: moto's standalone server on 127.0.0.1.

Use from a test module with::

    from tests.s3server import s3_bucket, s3_endpoint  # noqa: F401

``s3_endpoint`` (session) starts one server and installs fake credentials for the session;
``s3_bucket`` (per test) creates a fresh bucket and points ``AWS_ENDPOINT_URL`` at the server,
so code under test reaches it through the standard AWS environment, with no storage options.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Fake credentials and a fixed region, so nothing can reach a real account; the profile and
# config-file variables are cleared because a developer's ~/.aws/config may set an endpoint.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}
CLEARED_AWS_ENV = (
    "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """Run moto's S3 server on a free 127.0.0.1 port in a thread; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    # Port 0 lets the OS pick a free port; the server reports the one it bound.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def fake_aws_env(mp: pytest.MonkeyPatch, config_dir: Path) -> Iterator[None]:
    """Fake credentials, no profiles, and empty AWS config files, restored on exit."""
    for name in CLEARED_AWS_ENV:
        mp.delenv(name, raising=False)
    for name, value in FAKE_AWS_ENV.items():
        mp.setenv(name, value)
    mp.setenv("AWS_CONFIG_FILE", str(config_dir / "config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(config_dir / "credentials"))
    yield


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the test server (boto3 is a moto dependency)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def upload_dir(client: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    """Put ``files`` (name -> bytes) under ``s3://bucket/prefix/``."""
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix.strip('/')}/{name}", Body=data)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a moto S3 server that lives for the whole test session."""
    with pytest.MonkeyPatch.context() as mp, moto_server() as endpoint:
        with fake_aws_env(mp, tmp_path_factory.mktemp("aws-config")):
            yield endpoint


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh, empty bucket on the test server; ``AWS_ENDPOINT_URL`` points at the server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_client(s3_endpoint).create_bucket(Bucket=name)
    return name
