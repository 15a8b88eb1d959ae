"""Shared fixtures: real PostgreSQL and Redis, never mocks.

On a developer's machine without the service, tests that need it skip with the reason.
With ``CI=true`` a missing service is a failure: CI must exercise both for real.
"""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
POSTGRES_URL = os.environ.get(
    "QFLARE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("QFLARE_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 2
        ):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, default_port: int) -> str:
    if not _reachable(url, default_port):
        msg = f"{name} is not reachable at {url}"
        if IN_CI:
            pytest.fail(f"{msg} and CI=true: CI must run the {name} tests")
        pytest.skip(msg)
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return require_service("PostgreSQL", POSTGRES_URL, 5432)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return require_service("Redis", REDIS_URL, 6379)
