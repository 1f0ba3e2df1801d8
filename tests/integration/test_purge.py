"""Expired idempotency keys are purged; live ones stay."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from orders_api.db import idempotency_keys, orders
from orders_api.idempotency import purge_expired_keys
from tests.helpers import PROJECT_ROOT, FakeClock, auth


async def keys_of(engine: AsyncEngine, tenant: str) -> set[str]:
    async with engine.connect() as conn:
        rows = await conn.execute(
            select(idempotency_keys.c.key).where(idempotency_keys.c.tenant_id == tenant)
        )
    return {row.key for row in rows}


async def test_purge_removes_only_expired_keys(
    client: httpx.AsyncClient, engine: AsyncEngine, clock: FakeClock, tenant: str
) -> None:
    clock.advance(-7200)
    assert (await client.post("/orders", headers=auth(tenant, Idempotency_Key="old"))).is_success
    clock.advance(7200)
    assert (await client.post("/orders", headers=auth(tenant, Idempotency_Key="new"))).is_success
    assert await keys_of(engine, tenant) == {"old", "new"}

    removed = await purge_expired_keys(engine, timedelta(hours=1), datetime.now(UTC), batch_size=1)

    assert removed >= 1
    assert await keys_of(engine, tenant) == {"new"}
    async with engine.connect() as conn:
        kept = (await conn.execute(select(orders.c.id).where(orders.c.tenant_id == tenant))).all()
    assert len(kept) == 2, "purging keys never deletes orders"


async def test_purge_command(
    client: httpx.AsyncClient,
    engine: AsyncEngine,
    clock: FakeClock,
    tenant: str,
    database_url: str,
) -> None:
    clock.advance(-7200)
    assert (await client.post("/orders", headers=auth(tenant, Idempotency_Key="old"))).is_success
    result = await asyncio.to_thread(
        subprocess.run,
        [str(PROJECT_ROOT / ".venv/bin/orders-api"), "purge"],
        env={**os.environ, "DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert await keys_of(engine, tenant) == set()
