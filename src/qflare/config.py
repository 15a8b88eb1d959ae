"""One typed settings object, read from ``QFLARE_*`` environment variables and a TOML file.

Precedence (highest first): explicit arguments, environment, ``$QFLARE_DATA_DIR/qflare.toml``
(or the file named by ``QFLARE_CONFIG``), defaults. Nothing else in QFLARE reads ``os.environ``
for configuration.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from qflare.errors import QflareError


class ConfigError(QflareError):
    pass


_THRESHOLD = re.compile(r"(\d+)/(\d+)([smh]?)")
# A checkpoint origin doubles as its signed-note key name: printable ASCII, no space, no '+'.
_ORIGIN = re.compile(r"[!-*,-~]{1,255}")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600}


def parse_threshold(text: str) -> tuple[int, int] | None:
    """``"5/60"`` (or ``"5/1m"``): 5 events within 60 s, as ``(5, 60)``; ``"off"``: None."""
    text = text.strip().lower()
    if text == "off":
        return None
    match = _THRESHOLD.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not COUNT/SECONDS (e.g. 5/60, 5/1m) or off")
    count, window = int(match.group(1)), int(match.group(2)) * _UNIT[match.group(3)]
    if count < 1 or not 1 <= window <= 86400:
        raise ValueError(f"{text!r}: the count must be at least 1, the window 1 s to 1 day")
    return count, window


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
    # The audit log's origin: the first line of every checkpoint and the name of its signing
    # key (docs/AUDIT.md). Empty: qflare.local/<tenant>/audit. Devices and verifiers pin it,
    # so it is chosen once, before the first checkpoint, and not changed afterwards.
    audit_origin: str = ""

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

    # Security monitor (docs/MONITOR.md). Each detect_* threshold is "COUNT/SECONDS": the rule
    # fires when COUNT matching events fall within a sliding window of SECONDS; "off" disables
    # it. Counters live in Redis when redis_url is set (shared by replicas), else in process.
    monitor_enabled: bool = True
    # False: rules still fire, alert and store detection.triggered, but take no action.
    monitor_respond: bool = True
    monitor_block_seconds: int = Field(default=900, ge=1, le=7 * 86400)
    # Sources never blocked (a load balancer's health checker, an operator's bastion).
    monitor_trusted_sources: list[str] = Field(default_factory=list)
    # Alerts are also POSTed here as JSON (never on the request path; failures are logged).
    monitor_webhook_url: str = ""
    monitor_webhook_timeout: float = Field(default=2.0, gt=0, le=30)
    detect_handshake_failures_device: str = "20/60"  # alert
    detect_handshake_failures_source: str = "30/60"  # block the source
    detect_signature_invalid_device: str = "5/60"  # quarantine the device
    detect_signature_invalid_source: str = "10/60"  # block the source
    detect_replay_device: str = "5/60"  # revoke the device's sessions
    detect_replay_source: str = "10/60"  # block the source
    detect_clock_skew_device: str = "5/300"  # alert
    detect_enrollment_failures_source: str = "10/300"  # block the source
    detect_record_failures_device: str = "20/60"  # revoke the device's sessions
    detect_record_failures_source: str = "30/60"  # block the source
    detect_rekey_rate_device: str = "30/300"  # alert
    detect_key_rotation_rate: str = "5/3600"  # alert (server and device key rotations)

    @field_validator("database_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if value and not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("database_url must start with sqlite:// or postgresql://")
        return value

    @field_validator(
        "detect_handshake_failures_device",
        "detect_handshake_failures_source",
        "detect_signature_invalid_device",
        "detect_signature_invalid_source",
        "detect_replay_device",
        "detect_replay_source",
        "detect_clock_skew_device",
        "detect_enrollment_failures_source",
        "detect_record_failures_device",
        "detect_record_failures_source",
        "detect_rekey_rate_device",
        "detect_key_rotation_rate",
    )
    @classmethod
    def _threshold(cls, value: str) -> str:
        parse_threshold(value)
        return value

    @field_validator("audit_origin")
    @classmethod
    def _origin(cls, value: str) -> str:
        if value and not _ORIGIN.fullmatch(value):
            raise ValueError(
                "audit_origin is 1 to 255 printable ASCII characters without spaces or '+' "
                "(e.g. qflare.example.com/default/audit)"
            )
        return value

    @model_validator(mode="after")
    def _default_origin(self) -> Settings:
        if not self.audit_origin:
            self.audit_origin = f"qflare.local/{self.tenant}/audit"
        return self

    @field_validator("monitor_webhook_url")
    @classmethod
    def _webhook(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("monitor_webhook_url must be an http:// or https:// URL")
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
