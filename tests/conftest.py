"""Shared fixtures: a moto S3 server on loopback, a real local Ray cluster, and marker policy."""

from __future__ import annotations

import os
import socket
import uuid
from typing import Iterator

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    # The chaos, driver-process, real-cluster and interop suites run only when asked for by marker
    # (`make test-chaos`: -m chaos; `make test-driver`: -m driver, `make test-cluster`: -m cluster
    # and `make test-interop`: -m interop, which CI runs after the default tests).
    for marker in ("chaos", "driver", "cluster", "interop"):
        if marker not in (config.getoption("markexpr") or ""):
            held = [item for item in items if marker in item.keywords]
            if held:
                config.hook.pytest_deselected(items=held)
                items[:] = [item for item in items if marker not in item.keywords]
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA; none present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1; yields the endpoint and credentials as environment values.

    The values are also exported to os.environ for the session, so that s3fs (in this process and
    in Ray workers started afterwards) reaches the server through the usual AWS variables.
    """
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


@pytest.fixture()
def s3_bucket(s3_server: dict[str, str]) -> str:
    """A fresh, empty bucket on the moto server; returns its name."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server["AWS_ENDPOINT_URL"],
        aws_access_key_id=s3_server["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=s3_server["AWS_SECRET_ACCESS_KEY"],
        region_name=s3_server["AWS_DEFAULT_REGION"],
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def ray_cluster(s3_server: dict[str, str]) -> Iterator[None]:
    """A real local Ray cluster of our own (never an existing one), shut down after the session.

    Started after the moto server, so that its workers inherit the S3 endpoint and keys as a
    cluster node's environment would hold them (the driver forwards no credentials)."""
    import ray

    if ray.is_initialized():
        yield None
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield None
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def browser():
    """`open(html, screenshot) -> PageReport` in headless Chromium (tests/browser.py).

    `make setup` installs Debian's chromium where it is missing. Without it the test is skipped,
    unless LATENTCACHE_REQUIRE_BROWSER=1 (set by .ci/run), where a missing browser fails.
    """
    from tests.browser import find_chromium, open_page

    if find_chromium() is None:
        message = "no Chromium found ($CHROMIUM, chromium, chromium-browser, google-chrome); `make setup-browser`"
        if os.environ.get("LATENTCACHE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return open_page
