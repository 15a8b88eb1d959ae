"""What the ``qflare`` command tests share: an environment with nothing of the machine's
``QFLARE_*`` settings, the in-process runner, and direct access to the key manager for setup
the command has no verb for.

Test modules import the fixtures by name (``from cli.support import isolated_env``): pytest
uses a fixture that is in a test module's namespace, and ``isolated_env`` is autouse.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from typer.testing import CliRunner, Result

from qflare.cli import app
from qflare.config import Settings
from qflare.keys import KeyManager
from qflare.runtime import open_manager

T = TypeVar("T")
runner = CliRunner()


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("QFLARE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("QFLARE_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("QFLARE_DATA_DIR", str(tmp_path / "not-the-data-dir"))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def ready(data_dir: Path) -> Path:
    """A data directory after ``qflare init``."""
    ok(data_dir, "init")
    return data_dir


def qflare(data_dir: Path, *args: str, input: str | None = None) -> Result:
    return runner.invoke(app, ["--data-dir", str(data_dir), *args], input=input)


def ok(data_dir: Path, *args: str, input: str | None = None) -> dict[str, Any]:
    """Run with --json, expect success, return the one JSON document on stdout."""
    result = qflare(data_dir, "--json", *args, input=input)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


def with_manager(data_dir: Path, work: Callable[[KeyManager], Awaitable[T]]) -> T:
    async def run() -> T:
        manager = await open_manager(Settings(data_dir=data_dir))
        try:
            return await work(manager)
        finally:
            await manager.store.close()

    return asyncio.run(run())
