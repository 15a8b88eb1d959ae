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


def test_audit_origin_defaults_to_the_tenant_and_is_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("QFLARE_CONFIG", raising=False)
    monkeypatch.delenv("QFLARE_AUDIT_ORIGIN", raising=False)
    monkeypatch.delenv("QFLARE_TENANT", raising=False)
    assert Settings(data_dir=tmp_path).audit_origin == "qflare.local/default/audit"
    assert Settings(data_dir=tmp_path, tenant="acme").audit_origin == "qflare.local/acme/audit"
    (tmp_path / "qflare.toml").write_text('audit_origin = "log.example.com/acme"\n')
    assert Settings(data_dir=tmp_path, tenant="acme").audit_origin == "log.example.com/acme"
    monkeypatch.setenv("QFLARE_AUDIT_ORIGIN", "env.example/log")
    assert Settings(data_dir=tmp_path).audit_origin == "env.example/log"
    # It is also the signed-note key name: one line, no spaces, no '+'.
    for bad in ("two words", "a+b", "line\nbreak", "x" * 256, "tab\there", "caf\u00e9"):
        with pytest.raises(ValueError, match="audit_origin"):
            Settings(data_dir=tmp_path, audit_origin=bad)
