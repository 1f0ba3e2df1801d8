"""Settings, read once from the environment and handed to create_app."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    database_url: str = Field(
        default="", description="postgresql://…; unset: the embedded PostgreSQL in EMBEDDED_PG_DIR"
    )
    embedded_pg_dir: str = ".data/pg"
    db_pool_size: int = Field(default=10, ge=1)
    db_statement_timeout_ms: int = Field(default=5000, ge=100)
    db_lock_timeout_ms: int = Field(default=3000, ge=100)
    db_idle_lifetime_seconds: float = Field(default=300.0, gt=0)
    db_connect_timeout_seconds: float = Field(default=5.0, gt=0)
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
    relay_stream_replicas: int = Field(default=1, ge=1, le=5)
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
