"""One typed settings object, read from ``QFLARE_*`` environment variables and a TOML file.

Precedence (highest first): explicit arguments, environment, ``$QFLARE_DATA_DIR/qflare.toml``
(or the file named by ``QFLARE_CONFIG``), defaults. Nothing else in QFLARE reads ``os.environ``
for configuration.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from qflare.errors import QflareError


class ConfigError(QflareError):
    pass


def default_data_dir() -> Path:
    return Path(os.environ.get("QFLARE_DATA_DIR") or Path.home() / ".qflare")


class _TomlSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], data_dir: Path | None = None) -> None:
        super().__init__(settings_cls)
        base = data_dir if data_dir is not None else default_data_dir()
        path = Path(os.environ.get("QFLARE_CONFIG") or base / "qflare.toml")
        self._data: dict[str, Any] = {}
        if path.is_file():
            try:
                self._data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{path}: {exc}") from None

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="QFLARE_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = ""  # empty: sqlite:///<data_dir>/qflare.db
    tenant: str = "default"
    host: str = "127.0.0.1"
    port: int = Field(default=8420, ge=0, le=65535)
    master_key_file: Path | None = None  # default <data_dir>/master.key
    redis_url: str = ""

    # Protocol (docs/PROTOCOL.md).
    suites: list[str] = Field(
        default_factory=lambda: ["QFLARE-v1/ML-KEM-1024+X25519/ML-DSA-44/HKDF-SHA3-512/AES-256-GCM"]
    )
    epoch_seconds: int = Field(default=300, ge=1)
    grace_epochs: int = Field(default=1, ge=0, le=16)
    timestamp_window: int = Field(default=120, ge=1)
    biscuit_lifetime: int = Field(default=30, ge=1)
    session_max_age: int = Field(default=3600, ge=10)

    # Key ring: static keys rotate every rotation_days; the previous key keeps working for
    # overlap_seconds so devices pinned to it never see an outage.
    key_rotation_days: float = Field(default=30, gt=0)
    key_overlap_seconds: int = Field(default=7 * 86400, ge=0)

    # HTTP hygiene.
    max_body_bytes: int = Field(default=8 * 1024 * 1024, ge=1024)
    rate_limit_per_second: float = Field(default=50.0, gt=0)
    rate_limit_burst: int = Field(default=100, ge=1)
    cleanup_interval: int = Field(default=60, ge=1)

    # Federated learning under ``qflare serve``: a FedAvg task over models of fl_features
    # weights, closing a round after fl_min_updates devices sent theirs (0: no FL task).
    fl_features: int = Field(default=20, ge=1, le=1_000_000)
    fl_min_updates: int = Field(default=0, ge=0)

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("database_url must start with sqlite:// or postgresql://")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # An explicit data_dir (``qflare --data-dir``) also picks the config file in it.
        given = getattr(init_settings, "init_kwargs", {}).get("data_dir")
        data_dir = Path(given) if given is not None else None
        return (init_settings, env_settings, _TomlSource(settings_cls, data_dir))

    @property
    def store_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'qflare.db'}"

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self.data_dir / "master.key"
