"""Outbox statements for the relay. Each is one statement; the relay owns the transactions."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, case, delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from orders_api.db import outbox
from orders_api.outbox.models import OutboxEvent

_PENDING = (outbox.c.published_at.is_(None), outbox.c.dead_at.is_(None))


async def claim_due(
    conn: AsyncConnection, now: datetime, limit: int, lease: timedelta
) -> list[OutboxEvent]:
    """Lease up to `limit` due rows: attempts + 1, next_attempt_at = now + lease.

    On PostgreSQL `FOR UPDATE SKIP LOCKED` lets concurrent relays take disjoint rows, and the
    lease keeps a committed claim out of everyone else's reach until it expires (a relay that
    died mid-batch); SQLite renders no FOR UPDATE and its write lock serialises the claims.
    Rows come back oldest due first.
    """
    due = (
        select(outbox.c.id)
        .where(*_PENDING, outbox.c.next_attempt_at <= now)
        .order_by(outbox.c.next_attempt_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = (
        update(outbox)
        .where(outbox.c.id.in_(due.scalar_subquery()))
        .values(attempts=outbox.c.attempts + 1, next_attempt_at=now + lease)
        .returning(
            outbox.c.id,
            outbox.c.event_type,
            outbox.c.order_id,
            outbox.c.tenant_id,
            outbox.c.payload,
            outbox.c.created_at,
            outbox.c.attempts,
        )
    )
    rows = (await conn.execute(stmt)).all()
    events = [
        OutboxEvent(
            id=row.id,
            event_type=row.event_type,
            order_id=row.order_id,
            tenant_id=row.tenant_id,
            payload=row.payload,
            created_at=row.created_at,
            attempts=row.attempts,
        )
        for row in rows
    ]
    events.sort(key=lambda event: (event.created_at, event.id))
    return events


async def mark_published(conn: AsyncConnection, ids: Collection[uuid.UUID], now: datetime) -> int:
    """The broker acked these: they are delivered, whatever a racing relay recorded meanwhile."""
    stmt = (
        update(outbox)
        .where(outbox.c.id.in_(list(ids)), outbox.c.published_at.is_(None))
        .values(published_at=now, dead_at=None, last_error=None)
    )
    return (await conn.execute(stmt)).rowcount


@dataclass(frozen=True, slots=True)
class Failure:
    id: uuid.UUID
    next_attempt_at: datetime
    dead_at: datetime | None
    error: str


async def record_failures(conn: AsyncConnection, failures: Sequence[Failure]) -> None:
    """A failed attempt that counts: retry later (backoff) or park as dead."""
    stmt = (
        update(outbox)
        .where(outbox.c.id == bindparam("b_id"), outbox.c.published_at.is_(None))
        .values(
            next_attempt_at=bindparam("b_next"),
            dead_at=bindparam("b_dead"),
            last_error=bindparam("b_error"),
        )
    )
    await conn.execute(
        stmt,
        [
            {"b_id": f.id, "b_next": f.next_attempt_at, "b_dead": f.dead_at, "b_error": f.error}
            for f in failures
        ],
    )


async def release(
    conn: AsyncConnection, ids: Collection[uuid.UUID], now: datetime, error: str
) -> None:
    """Hand leased rows back after the broker was unreachable: the attempt is not charged."""
    stmt = (
        update(outbox)
        .where(outbox.c.id.in_(list(ids)), *_PENDING)
        .values(
            attempts=case((outbox.c.attempts > 0, outbox.c.attempts - 1), else_=0),
            next_attempt_at=now,
            last_error=error,
        )
    )
    await conn.execute(stmt)


async def requeue_dead(
    conn: AsyncConnection, now: datetime, ids: Collection[uuid.UUID] | None = None
) -> list[uuid.UUID]:
    """Dead rows (all, or the given ones) become pending again with a fresh attempt budget."""
    stmt = (
        update(outbox)
        .where(outbox.c.dead_at.is_not(None), outbox.c.published_at.is_(None))
        .values(dead_at=None, attempts=0, next_attempt_at=now)
        .returning(outbox.c.id)
    )
    if ids is not None:
        stmt = stmt.where(outbox.c.id.in_(list(ids)))
    return list((await conn.execute(stmt)).scalars())


async def delete_published_before(conn: AsyncConnection, cutoff: datetime, limit: int) -> int:
    """Delete at most `limit` rows published before `cutoff` (one bounded batch)."""
    doomed = (
        select(outbox.c.id)
        .where(outbox.c.published_at < cutoff)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    stmt = delete(outbox).where(outbox.c.id.in_(doomed.scalar_subquery()))
    return (await conn.execute(stmt)).rowcount


@dataclass(frozen=True, slots=True)
class PendingStats:
    rows: int
    oldest_created_at: datetime | None


async def pending_stats(conn: AsyncConnection) -> PendingStats:
    """Rows not yet delivered nor parked (in flight included), and the oldest one's age."""
    stmt = select(func.count(), func.min(outbox.c.created_at)).where(*_PENDING)
    count, oldest = (await conn.execute(stmt)).one()
    return PendingStats(rows=int(count), oldest_created_at=oldest)
