"""Settings: environment over the TOML file over defaults; an explicit data dir picks its file."""

from __future__ import annotations

from pathlib import Path

import pytest

from qflare.config import ConfigError, Settings


def test_an_explicit_data_dir_reads_its_own_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QFLARE_CONFIG", raising=False)
    monkeypatch.delenv("QFLARE_EPOCH_SECONDS", raising=False)
    (tmp_path / "qflare.toml").write_text("epoch_seconds = 7\nport = 9000\n")
    settings = Settings(data_dir=tmp_path)
    assert (settings.epoch_seconds, settings.port) == (7, 9000)
    assert settings.store_url == f"sqlite:///{tmp_path / 'qflare.db'}"
    monkeypatch.setenv("QFLARE_EPOCH_SECONDS", "11")
    assert Settings(data_dir=tmp_path).epoch_seconds == 11


def test_bad_values_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QFLARE_CONFIG", raising=False)
    with pytest.raises(ValueError, match="database_url"):
        Settings(data_dir=tmp_path, database_url="mysql://x")
    (tmp_path / "qflare.toml").write_text("epoch_seconds = [")
    with pytest.raises(ConfigError):
        Settings(data_dir=tmp_path)
