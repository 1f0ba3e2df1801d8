"""Expired idempotency keys are purged; live ones stay."""

from __future__ import annotations

import asyncio
import subprocess
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from orders_api.idempotency import purge_expired_keys
from orders_api.pool import Pool
from tests.helpers import FakeClock, auth, make_settings
from tests.live import ORDERS_API, server_env


async def keys_of(db: asyncpg.Pool, tenant: str) -> set[str]:
    rows = await db.fetch("SELECT key FROM idempotency_keys WHERE tenant_id = $1", tenant)
    return {row["key"] for row in rows}


async def test_purge_removes_only_expired_keys(
    client: httpx.AsyncClient, db: asyncpg.Pool, database_url: str, clock: FakeClock, tenant: str
) -> None:
    clock.advance(-7200)
    assert (await client.post("/orders", headers=auth(tenant, Idempotency_Key="old"))).is_success
    clock.advance(7200)
    assert (await client.post("/orders", headers=auth(tenant, Idempotency_Key="new"))).is_success
    assert await keys_of(db, tenant) == {"old", "new"}

    pool = Pool.from_settings("purge-test", make_settings(database_url), max_size=1)
    try:
        removed = await purge_expired_keys(
            pool, timedelta(hours=1), datetime.now(UTC), batch_size=1
        )
    finally:
        await pool.close()

    assert removed >= 1
    assert await keys_of(db, tenant) == {"new"}
    kept = await db.fetchval("SELECT count(*) FROM orders WHERE tenant_id = $1", tenant)
    assert kept == 2, "purging keys never deletes orders"


async def test_purge_command(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    clock: FakeClock,
    tenant: str,
    database_url: str,
) -> None:
    clock.advance(-7200)
    assert (await client.post("/orders", headers=auth(tenant, Idempotency_Key="old"))).is_success
    clock.advance(7200)
    assert (await client.post("/orders", headers=auth(tenant, Idempotency_Key="new"))).is_success
    result = await asyncio.to_thread(
        subprocess.run,
        [ORDERS_API, "purge"],
        env=server_env(database_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert await keys_of(db, tenant) == {"new"}
