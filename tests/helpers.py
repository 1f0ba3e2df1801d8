"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from orders_api.config import Settings

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class FakeClock:
    """Real time plus an offset the test can move forward."""

    offset: timedelta = field(default_factory=timedelta)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": database_url,
        "log_level": "WARNING",
        "idempotency_purge_interval_seconds": 3600,
    }
    values.update(overrides)
    return Settings.model_validate(values)


def auth(tenant: str, **headers: str) -> dict[str, str]:
    """Headers for a request as `tenant`; extra headers use underscores for dashes."""
    return {"X-Tenant-Id": tenant, **{k.replace("_", "-"): v for k, v in headers.items()}}
