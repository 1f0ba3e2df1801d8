"""Outbox statements for the relay. Each is one statement; the relay owns the transactions."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import orjson

from orders_api.outbox.models import OutboxEvent

_PENDING = "published_at IS NULL AND dead_at IS NULL"

# FOR UPDATE SKIP LOCKED lets concurrent relays take disjoint rows; once committed, the lease
# (next_attempt_at in the future) keeps the claim out of everyone's reach until it expires.
_CLAIM_DUE = f"""UPDATE outbox
SET attempts = attempts + 1, next_attempt_at = $2
WHERE id IN (
    SELECT id FROM outbox
    WHERE {_PENDING} AND next_attempt_at <= $1
    ORDER BY next_attempt_at
    LIMIT $3
    FOR UPDATE SKIP LOCKED
)
RETURNING id, event_type, order_id, tenant_id, payload::text, created_at, attempts
"""
_MARK_PUBLISHED = """UPDATE outbox SET published_at = $2, dead_at = NULL, last_error = NULL
WHERE id = ANY($1::uuid[]) AND published_at IS NULL
"""
_RECORD_FAILURE = """UPDATE outbox SET next_attempt_at = $2, dead_at = $3, last_error = $4
WHERE id = $1 AND published_at IS NULL
"""
_RELEASE = f"""UPDATE outbox
SET attempts = GREATEST(attempts - 1, 0), next_attempt_at = $2, last_error = $3
WHERE id = ANY($1::uuid[]) AND {_PENDING}
"""
_REQUEUE_DEAD = """UPDATE outbox SET dead_at = NULL, attempts = 0, next_attempt_at = $1
WHERE dead_at IS NOT NULL AND published_at IS NULL AND ($2::uuid[] IS NULL OR id = ANY($2))
RETURNING id
"""
_DELETE_PUBLISHED = """DELETE FROM outbox WHERE id IN (
    SELECT id FROM outbox WHERE published_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED
)
"""
_PENDING_STATS = f"SELECT count(*), min(created_at) FROM outbox WHERE {_PENDING}"


def _count(status: str) -> int:
    """The row count of a command tag such as `UPDATE 3`."""
    return int(status.rsplit(" ", 1)[-1])


async def claim_due(
    conn: asyncpg.Connection, now: datetime, limit: int, lease: timedelta
) -> list[OutboxEvent]:
    """Lease up to `limit` due rows (attempts + 1, next_attempt_at = now + lease), oldest first."""
    rows = await conn.fetch(_CLAIM_DUE, now, now + lease, limit)
    events = [
        OutboxEvent(
            id=row[0],
            event_type=row[1],
            order_id=row[2],
            tenant_id=row[3],
            payload=orjson.loads(row[4]),
            created_at=row[5],
            attempts=row[6],
        )
        for row in rows
    ]
    events.sort(key=lambda event: (event.created_at, event.id))
    return events


async def mark_published(
    conn: asyncpg.Connection, ids: Collection[uuid.UUID], now: datetime
) -> int:
    """The broker acked these: they are delivered, whatever a racing relay recorded meanwhile."""
    return _count(await conn.execute(_MARK_PUBLISHED, list(ids), now))


@dataclass(frozen=True, slots=True)
class Failure:
    id: uuid.UUID
    next_attempt_at: datetime
    dead_at: datetime | None
    error: str


async def record_failures(conn: asyncpg.Connection, failures: Sequence[Failure]) -> None:
    """A failed attempt that counts: retry later (backoff) or park as dead."""
    await conn.executemany(
        _RECORD_FAILURE, [(f.id, f.next_attempt_at, f.dead_at, f.error) for f in failures]
    )


async def release(
    conn: asyncpg.Connection, ids: Collection[uuid.UUID], now: datetime, error: str
) -> None:
    """Hand leased rows back after the broker was unreachable: the attempt is not charged."""
    await conn.execute(_RELEASE, list(ids), now, error)


async def requeue_dead(
    conn: asyncpg.Connection, now: datetime, ids: Collection[uuid.UUID] | None = None
) -> list[uuid.UUID]:
    """Dead rows (all, or the given ones) become pending again with a fresh attempt budget."""
    rows = await conn.fetch(_REQUEUE_DEAD, now, None if ids is None else list(ids))
    return [row[0] for row in rows]


async def delete_published_before(conn: asyncpg.Connection, cutoff: datetime, limit: int) -> int:
    """Delete at most `limit` rows published before `cutoff` (one bounded batch)."""
    return _count(await conn.execute(_DELETE_PUBLISHED, cutoff, limit))


@dataclass(frozen=True, slots=True)
class PendingStats:
    rows: int
    oldest_created_at: datetime | None


async def pending_stats(conn: asyncpg.Connection) -> PendingStats:
    """Rows not yet delivered nor parked (in flight included), and the oldest one's age."""
    row = await conn.fetchrow(_PENDING_STATS)
    return PendingStats(rows=int(row[0]), oldest_created_at=row[1])
