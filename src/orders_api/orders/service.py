"""Order use cases: each is one transaction; on PostgreSQL one statement (see orders/pg.py).

Responses leave here encoded, once: on PostgreSQL the database builds an order's JSON, and
the create response is the very document stored with the idempotency key.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import Row
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orders_api import idempotency
from orders_api.errors import Conflict, NotFound, request_in_progress
from orders_api.orders import repository
from orders_api.orders.pg import PgOrders
from orders_api.pagination import encode_cursor

ORDER_CLOSED = "orders.closed"
CREATED_FIELDS = ("id", "tenantId", "status", "version", "createdAt")


@dataclass(frozen=True, slots=True)
class Backend:
    """Where the use cases run: asyncpg statements when `pg` is set (PostgreSQL), else
    SQLAlchemy Core on `engine` (writes) and `reader` (reads: SQLite begins DEFERRED)."""

    engine: AsyncEngine
    reader: AsyncEngine
    pg: PgOrders | None = None


@dataclass(frozen=True, slots=True)
class CreateResult:
    body: bytes
    order_id: str
    replayed: bool


@dataclass(frozen=True, slots=True)
class Encoded:
    """A response body, encoded once, and the order version for its ETag."""

    body: bytes
    version: int


def iso(value: datetime) -> str:
    """ISO 8601 UTC with microseconds, always six digits."""
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


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


def key_reused() -> Conflict:
    return Conflict(
        "Idempotency-Key was already used with a different request body",
        {"reason": "idempotency_key_reused"},
    )


def _replayed(stored: Mapping[str, Any]) -> CreateResult:
    # jsonb does not keep key order: put the stored body back in the order it was sent.
    body = orjson.dumps({name: stored[name] for name in CREATED_FIELDS})
    return CreateResult(body, str(stored["id"]), replayed=True)


async def create_order(
    db: Backend,
    tenant_id: str,
    key: str,
    request_hash: str,
    now: datetime,
    window: timedelta,
) -> CreateResult:
    """Create a draft once per (tenant, key); later requests with the key replay the response."""
    order_id = uuid.uuid4()
    document: dict[str, Any] = {
        "id": str(order_id),
        "tenantId": tenant_id,
        "status": "draft",
        "version": 1,
        "createdAt": iso(now),
    }
    body = orjson.dumps(document)
    if db.pg is not None:
        found = await db.pg.claim_key_and_create(
            tenant_id, key, request_hash, body, order_id, now, window
        )
        if found is None:
            return CreateResult(body, str(order_id), replayed=False)
        if found.request_hash != request_hash:
            raise key_reused()
        return _replayed(orjson.loads(found.response))

    async with db.engine.begin() as conn:
        if await repository.claim_key(conn, tenant_id, key, request_hash, 201, document, now):
            await repository.insert_order(conn, order_id, tenant_id, now)
            return CreateResult(body, str(order_id), replayed=False)
        stored = await idempotency.find_key(conn, tenant_id, key, for_update=True)
        if stored is None or stored.created_at <= now - window:
            # Expired (or purged between the two statements): the key is free again.
            if stored is None:
                if not await repository.claim_key(
                    conn, tenant_id, key, request_hash, 201, document, now
                ):
                    raise request_in_progress()
            else:
                await repository.take_over_key(
                    conn, tenant_id, key, request_hash, 201, document, now
                )
            await repository.insert_order(conn, order_id, tenant_id, now)
            return CreateResult(body, str(order_id), replayed=False)
    if stored.request_hash != request_hash:
        raise key_reused()
    return _replayed(stored.body)


async def key_in_use(
    db: Backend,
    tenant_id: str,
    key: str,
    request_hash: str,
    now: datetime,
    window: timedelta,
) -> bool:
    """For a body that fails validation: is the key stored for another request (409 first)?"""
    if db.pg is not None:
        found = await db.pg.find_key(tenant_id, key)
    else:
        async with db.reader.connect() as conn:
            stored = await idempotency.find_key(conn, tenant_id, key)
        found = None if stored is None else (stored.request_hash, stored.created_at)
    return found is not None and found[1] > now - window and found[0] != request_hash


def _failed_change(current: tuple[int, str] | None, expected: Collection[int] | None) -> Exception:
    """After a conditional UPDATE matched nothing, the row tells 404, stale or bad state."""
    if current is None:
        return NotFound("order not found")
    version, status = current
    if expected is not None and version not in expected:
        return Conflict(
            "stale version",
            {"reason": "stale_version", "currentVersion": version},
            headers={"ETag": f'"{version}"'},
        )
    return Conflict(
        f"order is {status}",
        {"reason": "invalid_transition", "currentStatus": status},
    )


async def _explain_failed_change(
    conn: AsyncConnection,
    tenant_id: str,
    order_id: uuid.UUID,
    expected: Collection[int] | None,
) -> Exception:
    row = await repository.get_order(conn, tenant_id, order_id)
    return _failed_change(None if row is None else (row.version, row.status), expected)


async def confirm_order(
    db: Backend,
    tenant_id: str,
    order_id: uuid.UUID,
    expected: Collection[int] | None,
    total_cents: int,
    now: datetime,
) -> Encoded:
    if db.pg is not None:
        version = await db.pg.confirm(tenant_id, order_id, expected, total_cents, now)
        if version is None:
            current = await db.pg.current_state(tenant_id, order_id)
            raise _failed_change(current, expected)
    else:
        async with db.engine.begin() as conn:
            row = await repository.confirm_order(
                conn, tenant_id, order_id, expected, total_cents, now
            )
            if row is None:
                raise await _explain_failed_change(conn, tenant_id, order_id, expected)
        version = row.version
    body = {"id": str(order_id), "status": "confirmed", "version": version}
    body["totalCents"] = total_cents
    return Encoded(orjson.dumps(body), version)


async def close_order(
    db: Backend,
    tenant_id: str,
    order_id: uuid.UUID,
    expected: Collection[int] | None,
    now: datetime,
) -> Encoded:
    """confirmed -> closed and its orders.closed outbox row, in one transaction."""
    if db.pg is not None:
        version = await db.pg.close(tenant_id, order_id, expected, now, iso(now))
        if version is None:
            current = await db.pg.current_state(tenant_id, order_id)
            raise _failed_change(current, expected)
    else:
        async with db.engine.begin() as conn:
            row = await repository.close_order(conn, tenant_id, order_id, expected, now)
            if row is None:
                raise await _explain_failed_change(conn, tenant_id, order_id, expected)
            payload = {
                "orderId": str(row.id),
                "tenantId": tenant_id,
                "totalCents": row.total_cents,
                "closedAt": iso(row.updated_at),
            }
            await repository.insert_outbox_event(
                conn, ORDER_CLOSED, row.id, tenant_id, payload, now
            )
        version = row.version
    body = {"id": str(order_id), "status": "closed", "version": version}
    return Encoded(orjson.dumps(body), version)


async def get_order(db: Backend, tenant_id: str, order_id: uuid.UUID) -> Encoded:
    if db.pg is not None:
        found = await db.pg.get(tenant_id, order_id)
        if found is None:
            raise NotFound("order not found")
        return Encoded(found[1].encode(), found[0])
    async with db.reader.connect() as conn:
        row = await repository.get_order(conn, tenant_id, order_id)
    if row is None:
        raise NotFound("order not found")
    return Encoded(orjson.dumps(order_json(row)), row.version)


async def list_orders(
    db: Backend,
    tenant_id: str,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
    cursor_secret: bytes,
) -> bytes:
    """One page, newest first, and the cursor after its last row (null on the last page)."""
    if db.pg is not None:
        rows = await db.pg.list_page(tenant_id, limit + 1, after)
        items = ",".join(row[2] for row in rows[:limit])
        last = rows[limit - 1] if len(rows) > limit else None
        after_last = None if last is None else (last[0], last[1])
    else:
        async with db.reader.connect() as conn:
            page = await repository.list_orders(conn, tenant_id, limit, after)
        items = ",".join(orjson.dumps(order_json(row)).decode() for row in page[:limit])
        end = page[limit - 1] if len(page) > limit else None
        after_last = None if end is None else (end.created_at, end.id)
    next_cursor = "null"
    if after_last is not None:
        next_cursor = f'"{encode_cursor(cursor_secret, tenant_id, *after_last)}"'
    return f'{{"items":[{items}],"nextCursor":{next_cursor}}}'.encode()
