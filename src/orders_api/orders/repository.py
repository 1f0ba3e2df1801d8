"""Order statements. Each state change is one conditional statement; nothing here commits."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Row, insert, literal, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from orders_api.db import UtcDateTime, idempotency_keys, orders, outbox
from orders_api.outbox import NOTIFY_CHANNEL

ORDER_COLUMNS = (
    orders.c.id,
    orders.c.tenant_id,
    orders.c.status,
    orders.c.version,
    orders.c.total_cents,
    orders.c.created_at,
    orders.c.updated_at,
)


async def claim_key(
    conn: AsyncConnection,
    tenant_id: str,
    key: str,
    request_hash: str,
    status_code: int,
    response: dict[str, Any],
    now: datetime,
) -> bool:
    """Insert the key with its final response; False when the key exists (after it commits)."""
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    stmt = (
        dialect_insert(idempotency_keys)
        .values(
            tenant_id=tenant_id,
            key=key,
            request_hash=request_hash,
            status_code=status_code,
            response_json=response,
            created_at=now,
        )
        .on_conflict_do_nothing(index_elements=["tenant_id", "key"])
        .returning(idempotency_keys.c.tenant_id)
    )
    return (await conn.execute(stmt)).first() is not None


async def take_over_key(
    conn: AsyncConnection,
    tenant_id: str,
    key: str,
    request_hash: str,
    status_code: int,
    response: dict[str, Any],
    now: datetime,
) -> None:
    """Reuse an expired key (its row is locked by the caller) for a new request."""
    await conn.execute(
        update(idempotency_keys)
        .where(idempotency_keys.c.tenant_id == tenant_id, idempotency_keys.c.key == key)
        .values(
            request_hash=request_hash,
            status_code=status_code,
            response_json=response,
            created_at=now,
        )
    )


async def insert_order(
    conn: AsyncConnection, order_id: uuid.UUID, tenant_id: str, now: datetime
) -> None:
    await conn.execute(
        insert(orders).values(
            id=order_id,
            tenant_id=tenant_id,
            status="draft",
            version=1,
            total_cents=None,
            created_at=now,
            updated_at=now,
        )
    )


def _version_condition(expected: Collection[int] | None) -> Any:
    if expected is None:
        return None
    return orders.c.version.in_(sorted(expected))


async def confirm_order(
    conn: AsyncConnection,
    tenant_id: str,
    order_id: uuid.UUID,
    expected: Collection[int] | None,
    total_cents: int,
    now: datetime,
) -> Row[Any] | None:
    """draft -> confirmed in one conditional UPDATE; None when any condition failed."""
    stmt = (
        update(orders)
        .where(
            orders.c.id == order_id,
            orders.c.tenant_id == tenant_id,
            orders.c.status == "draft",
        )
        .values(
            status="confirmed",
            total_cents=total_cents,
            version=orders.c.version + 1,
            updated_at=now,
        )
        .returning(orders.c.id, orders.c.version, orders.c.total_cents)
    )
    condition = _version_condition(expected)
    if condition is not None:
        stmt = stmt.where(condition)
    return (await conn.execute(stmt)).first()


async def close_order(
    conn: AsyncConnection,
    tenant_id: str,
    order_id: uuid.UUID,
    expected: Collection[int] | None,
    now: datetime,
) -> Row[Any] | None:
    """confirmed -> closed; None when any condition failed (a racing close finds 'closed')."""
    stmt = (
        update(orders)
        .where(
            orders.c.id == order_id,
            orders.c.tenant_id == tenant_id,
            orders.c.status == "confirmed",
        )
        .values(status="closed", version=orders.c.version + 1, updated_at=now)
        .returning(orders.c.id, orders.c.version, orders.c.total_cents, orders.c.updated_at)
    )
    condition = _version_condition(expected)
    if condition is not None:
        stmt = stmt.where(condition)
    return (await conn.execute(stmt)).first()


async def insert_outbox_event(
    conn: AsyncConnection,
    event_type: str,
    order_id: uuid.UUID,
    tenant_id: str,
    payload: dict[str, Any],
    now: datetime,
) -> uuid.UUID:
    event_id = uuid.uuid4()
    await conn.execute(
        insert(outbox).values(
            id=event_id,
            event_type=event_type,
            order_id=order_id,
            tenant_id=tenant_id,
            payload=payload,
            created_at=now,
            next_attempt_at=now,
            attempts=0,
        )
    )
    if conn.dialect.name == "postgresql":
        # Delivered to the relay's LISTEN when (and only if) this transaction commits.
        await conn.execute(text(f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"))
    return event_id


async def get_order(conn: AsyncConnection, tenant_id: str, order_id: uuid.UUID) -> Row[Any] | None:
    stmt = select(*ORDER_COLUMNS).where(orders.c.id == order_id, orders.c.tenant_id == tenant_id)
    return (await conn.execute(stmt)).first()


async def list_orders(
    conn: AsyncConnection,
    tenant_id: str,
    limit: int,
    after: tuple[datetime, uuid.UUID] | None,
) -> Sequence[Row[Any]]:
    """Newest first on the (tenant_id, created_at DESC, id DESC) index; fetches limit+1."""
    stmt = select(*ORDER_COLUMNS).where(orders.c.tenant_id == tenant_id)
    if after is not None:
        created_at, order_id = after
        stmt = stmt.where(
            tuple_(orders.c.created_at, orders.c.id)
            < tuple_(literal(created_at, UtcDateTime), literal(order_id, orders.c.id.type))
        )
    stmt = stmt.order_by(orders.c.created_at.desc(), orders.c.id.desc()).limit(limit + 1)
    return (await conn.execute(stmt)).all()
