"""A commit whose wait for the synchronous standby is cancelled is never acknowledged.

PostgreSQL commits locally, then waits for the standby; when that wait is cancelled (here by
the client's timeout and cancel request, or a dropped connection) it only warns, and the
row is visible on the primary although a failover may lose it. The API must answer 503, and a
retry with the same Idempotency-Key must not replay the row with 200 until the standby has it.
A private embedded PostgreSQL plays the primary, with a synchronous standby that never comes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from orders_api import embedded
from orders_api.app import create_app
from orders_api.migrations import upgrade
from tests.helpers import auth, make_settings


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[str]:
    folder = tmp_path / "pg"
    url = embedded.start(folder)
    try:
        upgrade(url)
        yield url
    finally:
        embedded.release(folder)


async def _standby_required(url: str, required: bool) -> None:
    conn = await asyncpg.connect(url)
    try:
        if required:
            await conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'phantom'")
        else:
            await conn.execute("ALTER SYSTEM RESET synchronous_standby_names")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def _cancelled_while_waiting(url: str, request: Awaitable[httpx.Response]) -> httpx.Response:
    """Send the request; once its commit waits for the standby, cancel that wait (what a
    client's timeout does: a cancel request), and return the answer."""
    answer = asyncio.ensure_future(request)
    conn = await asyncpg.connect(url)
    try:
        for _ in range(100):
            waiting = await conn.fetch(
                "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
            )
            if waiting:
                for row in waiting:
                    await conn.execute("SELECT pg_cancel_backend($1)", row["pid"])
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("no commit waited for the standby")
    finally:
        await conn.close()
    return await answer


async def _orders_of(url: str, tenant: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM orders WHERE tenant_id = $1", tenant))
    finally:
        await conn.close()


async def test_unconfirmed_commits_are_never_acknowledged(primary: str) -> None:
    settings = make_settings(primary)
    tenant = f"t-{uuid.uuid4().hex[:12]}"
    async with LifespanManager(create_app(settings)) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            created = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k-1"))
            assert created.status_code == 201
            order_id = created.json()["id"]
            confirmed = await client.patch(
                f"/orders/{order_id}/confirm",
                headers=auth(tenant, If_Match='"1"'),
                json={"totalCents": 10},
            )
            assert confirmed.status_code == 200

            await _standby_required(primary, True)
            # A new create: its commit's wait for the standby is cancelled, PostgreSQL only
            # warns and the row is visible here, but a failover may lose it -> 503.
            create = client.post("/orders", headers=auth(tenant, Idempotency_Key="k-2"))
            lost = await _cancelled_while_waiting(primary, create)
            assert lost.status_code == 503, lost.text
            assert lost.json()["code"] == "unavailable", lost.text
            assert await _orders_of(primary, tenant) == 2
            # Its retry finds the stored key, but does not replay it while unconfirmed.
            retry = client.post("/orders", headers=auth(tenant, Idempotency_Key="k-2"))
            retried = await _cancelled_while_waiting(primary, retry)
            assert retried.status_code == 503, retried.text
            # The same for a keyed close and its retry.
            closing = auth(tenant, If_Match='"2"', Idempotency_Key="c-1")
            close = client.post(f"/orders/{order_id}/close", headers=closing)
            closed = await _cancelled_while_waiting(primary, close)
            assert closed.status_code == 503, closed.text
            close_again = client.post(f"/orders/{order_id}/close", headers=closing)
            closed_again = await _cancelled_while_waiting(primary, close_again)
            assert closed_again.status_code == 503, closed_again.text

            await _standby_required(primary, False)
            replayed = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k-2"))
            assert replayed.status_code == 200, replayed.text
            assert replayed.headers["Idempotent-Replayed"] == "true"
            closed_replay = await client.post(f"/orders/{order_id}/close", headers=closing)
            assert closed_replay.status_code == 200, closed_replay.text
            assert closed_replay.headers["Idempotent-Replayed"] == "true"
            assert closed_replay.json()["version"] == 3
