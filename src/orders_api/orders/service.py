"""Order use cases: each opens its own transaction and runs one conditional statement."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orders_api import idempotency
from orders_api.errors import Conflict, NotFound, request_in_progress
from orders_api.orders import repository
from orders_api.pagination import encode_cursor

ORDER_CLOSED = "orders.closed"


def iso(value: datetime) -> str:
    """ISO 8601 UTC with microseconds, always six digits."""
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def order_json(row: Row[Any]) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "tenantId": row.tenant_id,
        "status": row.status,
        "version": row.version,
        "totalCents": row.total_cents,
        "createdAt": iso(row.created_at),
        "updatedAt": iso(row.updated_at),
    }


@dataclass(frozen=True, slots=True)
class CreateResult:
    body: dict[str, Any]
    replayed: bool


def key_reused() -> Conflict:
    return Conflict(
        "Idempotency-Key was already used with a different request body",
        {"reason": "idempotency_key_reused"},
    )


async def create_order(
    engine: AsyncEngine,
    tenant_id: str,
    key: str,
    request_hash: str,
    now: datetime,
    window: timedelta,
) -> CreateResult:
    """Create a draft once per (tenant, key); later requests with the key replay the response."""
    order_id = uuid.uuid4()
    body = {
        "id": str(order_id),
        "tenantId": tenant_id,
        "status": "draft",
        "version": 1,
        "createdAt": iso(now),
    }
    async with engine.begin() as conn:
        if await repository.claim_key(conn, tenant_id, key, request_hash, 201, body, now):
            await repository.insert_order(conn, order_id, tenant_id, now)
            return CreateResult(body, replayed=False)
        stored = await idempotency.find_key(conn, tenant_id, key, for_update=True)
        if stored is None or stored.created_at <= now - window:
            # Expired (or purged between the two statements): the key is free again.
            if stored is None:
                if not await repository.claim_key(
                    conn, tenant_id, key, request_hash, 201, body, now
                ):
                    raise request_in_progress()
            else:
                await repository.take_over_key(conn, tenant_id, key, request_hash, 201, body, now)
            await repository.insert_order(conn, order_id, tenant_id, now)
            return CreateResult(body, replayed=False)
    if stored.request_hash != request_hash:
        raise key_reused()
    # jsonb does not keep key order: put the stored body back in the order it was sent.
    replay = {name: stored.body[name] for name in body}
    return CreateResult(replay, replayed=True)


async def key_in_use(
    reader: AsyncEngine,
    tenant_id: str,
    key: str,
    request_hash: str,
    now: datetime,
    window: timedelta,
) -> bool:
    """For a body that fails validation: is the key stored for another request (409 first)?"""
    async with reader.connect() as conn:
        stored = await idempotency.find_key(conn, tenant_id, key)
    return (
        stored is not None
        and stored.created_at > now - window
        and stored.request_hash != request_hash
    )


async def _explain_failed_change(
    conn: AsyncConnection,
    tenant_id: str,
    order_id: uuid.UUID,
    expected: Collection[int] | None,
) -> Exception:
    """One read after a conditional UPDATE matched nothing: 404, stale version or bad state."""
    row = await repository.get_order(conn, tenant_id, order_id)
    if row is None:
        return NotFound("order not found")
    if expected is not None and row.version not in expected:
        return Conflict(
            "stale version",
            {"reason": "stale_version", "currentVersion": row.version},
            headers={"ETag": f'"{row.version}"'},
        )
    return Conflict(
        f"order is {row.status}",
        {"reason": "invalid_transition", "currentStatus": row.status},
    )


async def confirm_order(
    engine: AsyncEngine,
    tenant_id: str,
    order_id: uuid.UUID,
    expected: Collection[int] | None,
    total_cents: int,
    now: datetime,
) -> dict[str, Any]:
    async with engine.begin() as conn:
        row = await repository.confirm_order(conn, tenant_id, order_id, expected, total_cents, now)
        if row is None:
            raise await _explain_failed_change(conn, tenant_id, order_id, expected)
    return {
        "id": str(row.id),
        "status": "confirmed",
        "version": row.version,
        "totalCents": row.total_cents,
    }


async def close_order(
    engine: AsyncEngine,
    tenant_id: str,
    order_id: uuid.UUID,
    expected: Collection[int] | None,
    now: datetime,
) -> dict[str, Any]:
    """confirmed -> closed and its orders.closed outbox row, in one transaction."""
    async with engine.begin() as conn:
        row = await repository.close_order(conn, tenant_id, order_id, expected, now)
        if row is None:
            raise await _explain_failed_change(conn, tenant_id, order_id, expected)
        payload = {
            "orderId": str(row.id),
            "tenantId": tenant_id,
            "totalCents": row.total_cents,
            "closedAt": iso(row.updated_at),
        }
        await repository.insert_outbox_event(conn, ORDER_CLOSED, row.id, tenant_id, payload, now)
    return {"id": str(row.id), "status": "closed", "version": row.version}


async def get_order(reader: AsyncEngine, tenant_id: str, order_id: uuid.UUID) -> dict[str, Any]:
    async with reader.connect() as conn:
        row = await repository.get_order(conn, tenant_id, order_id)
    if row is None:
        raise NotFound("order not found")
    return order_json(row)


async def list_orders(
    reader: AsyncEngine,
    tenant_id: str,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    cursor_secret: bytes,
) -> dict[str, Any]:
    async with reader.connect() as conn:
        rows = await repository.list_orders(conn, tenant_id, limit, after)
    page = rows[:limit]
    next_cursor = None
    if len(rows) > limit:
        last = page[-1]
        next_cursor = encode_cursor(cursor_secret, tenant_id, last.created_at, last.id)
    return {"items": [order_json(row) for row in page], "nextCursor": next_cursor}
