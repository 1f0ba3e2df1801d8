"""Settings, read once from the environment and handed to create_app."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SQLITE_PATH = Path(".data") / "orders.db"


def normalise_database_url(url: str | None) -> str:
    """Add the async driver to a plain URL; no URL means the embedded SQLite file."""
    if not url:
        return f"sqlite+aiosqlite:///{DEFAULT_SQLITE_PATH}"
    for plain, driver in (
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    database_url: str = Field(default="", description="postgresql://… or sqlite:///path")
    db_pool_size: int = Field(default=10, ge=1)
    db_statement_timeout_ms: int = Field(default=5000, ge=100)
    db_lock_timeout_ms: int = Field(default=3000, ge=100)
    sqlite_busy_timeout_ms: int = Field(default=5000, ge=100)
    migrate_on_start: bool | None = None

    idempotency_window_seconds: int = Field(default=3600, ge=1)
    idempotency_purge_interval_seconds: int = Field(default=300, ge=1)
    cursor_secret: str = ""

    auth_mode: Literal["header", "jwt"] = "header"
    jwt_algorithm: Literal["HS256", "RS256", "ES256"] = "HS256"
    jwt_secret: str = ""
    jwt_public_key_file: str = ""
    jwt_jwks_file: str = ""
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_tenant_claim: str = "tenant_id"
    jwt_leeway_seconds: int = Field(default=0, ge=0)

    max_body_bytes: int = Field(default=1024 * 1024, ge=1)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    log_level: str = "INFO"
    otel_exporter: Literal["none", "console", "otlp"] = "none"
    otel_service_name: str = "orders-api"

    nats_url: str = ""
    relay_stream: str = "ORDERS"
    relay_subject_prefix: str = "orders"
    relay_batch_size: int = Field(default=100, ge=1, le=10_000)
    relay_poll_interval_ms: int = Field(default=500, ge=10)
    relay_max_attempts: int = Field(default=10, ge=1)
    relay_backoff_base_ms: int = Field(default=500, ge=1)
    relay_backoff_max_ms: int = Field(default=60_000, ge=1)
    relay_publish_timeout_ms: int = Field(default=5000, ge=100)
    relay_retention_hours: float = Field(default=168.0, gt=0)
    relay_metrics_port: int = Field(default=0, ge=0, le=65535)
    relay_metrics_host: str = "0.0.0.0"
    relay_stream_subjects: str = Field(default="", description="comma-separated; '' = <prefix>.>")
    relay_duplicate_window_seconds: float = Field(default=120.0, gt=0)
    relay_lease_seconds: float = Field(default=30.0, gt=0)
    relay_reconnect_wait_ms: int = Field(default=1000, ge=10)
    relay_retention_interval_seconds: float = Field(default=300.0, gt=0)

    @field_validator("database_url", mode="after")
    @classmethod
    def _add_driver(cls, value: str) -> str:
        return normalise_database_url(value)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def should_migrate_on_start(self) -> bool:
        """The embedded default migrates itself; PostgreSQL is migrated by `orders-api migrate`."""
        return self.is_sqlite if self.migrate_on_start is None else self.migrate_on_start
