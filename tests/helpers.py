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


def with_database(server_url: str, database: str) -> str:
    """The URL of another database on the same server."""
    scheme, _, rest = server_url.partition("://")
    location, _, query = rest.partition("?")
    hosts = location.split("/", 1)[0]
    return f"{scheme}://{hosts}/{database}" + (f"?{query}" if query else "")


def server_address(url: str) -> tuple[str, int, str]:
    """(host or socket directory, port, database) of a one-host postgresql:// URL."""
    _, _, rest = url.partition("://")
    location, _, query = rest.partition("?")
    hosts, _, database = location.partition("/")
    parameters = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
    host_port = hosts.rsplit("@", 1)[-1]
    host, _, port = host_port.partition(":")
    return (
        parameters.get("host") or host or "127.0.0.1",
        int(parameters.get("port") or port or 5432),
        database or "postgres",
    )


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
