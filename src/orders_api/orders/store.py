"""The order use cases' SQL on asyncpg: one statement (one round trip) per use case.

Every statement runs in autocommit, so a single statement is its own transaction:

create   INSERT the key ON CONFLICT DO NOTHING and, in the same CTE, INSERT the order only if
         the key was inserted. A second request with the key blocks on the first one's
         uncommitted key (unique index) until it commits, then finds the key: it replays.
         Its statement snapshot predates that commit, so it sees no row and looks again
         with a new statement. An expired key is taken over by a conditional UPDATE (same
         CTE shape) that a concurrent takeover re-checks and loses. The stored response is
         the body we send, encoded once.
confirm  one conditional UPDATE ... RETURNING; zero rows -> one read tells 404 / stale /
close    invalid transition. close's UPDATE and its outbox INSERT are one CTE: one
         transaction, and only the close that changed the row writes the event.
get/list the database builds each order's JSON; the page is joined, never re-encoded.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import NamedTuple

import asyncpg

from orders_api.errors import request_in_progress
from orders_api.outbox import NOTIFY_CHANNEL
from orders_api.pool import Pool

# created_at / updated_at as the API writes them: UTC, always six fractional digits.
ISO_FORMAT = """'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'"""
ORDER_DOCUMENT = f"""row_to_json(doc)::text
FROM orders AS o,
LATERAL (
    SELECT o.id, o.tenant_id AS "tenantId", o.status, o.version, o.total_cents AS "totalCents",
           to_char(o.created_at AT TIME ZONE 'UTC', {ISO_FORMAT}) AS "createdAt",
           to_char(o.updated_at AT TIME ZONE 'UTC', {ISO_FORMAT}) AS "updatedAt"
) AS doc
"""

CLAIM_KEY_AND_CREATE = """WITH claimed AS (
    INSERT INTO idempotency_keys
        (tenant_id, key, request_hash, status_code, response_json, created_at)
    VALUES ($1, $2, $3, 201, $4::jsonb, $5)
    ON CONFLICT (tenant_id, key) DO NOTHING
    RETURNING created_at
), created AS (
    INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at)
    SELECT $6, $1, 'draft', 1, NULL, $5, $5 FROM claimed
)
SELECT true AS created, NULL::text AS request_hash, NULL::timestamptz AS stored_at,
       NULL::text AS response
FROM claimed
UNION ALL
SELECT false, k.request_hash, k.created_at, k.response_json::text
FROM idempotency_keys AS k
WHERE k.tenant_id = $1 AND k.key = $2 AND NOT EXISTS (SELECT FROM claimed)
"""

TAKE_OVER_KEY_AND_CREATE = """WITH taken AS (
    UPDATE idempotency_keys
    SET request_hash = $3, status_code = 201, response_json = $4::jsonb, created_at = $5
    WHERE tenant_id = $1 AND key = $2 AND created_at <= $7
    RETURNING created_at
), created AS (
    INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at, updated_at)
    SELECT $6, $1, 'draft', 1, NULL, $5, $5 FROM taken
)
SELECT count(*) FROM taken
"""

FIND_KEY = "SELECT request_hash, created_at FROM idempotency_keys WHERE tenant_id = $1 AND key = $2"

# A change with an Idempotency-Key ($6, its fingerprint $7) stores its response in the same
# statement, so the key and the change commit together; without one ($6 NULL) nothing is
# stored. The INSERT has no ON CONFLICT on purpose: a key already stored, or committed by a
# concurrent request (which this one waits for), fails the whole statement with a unique
# violation, and with it the change: the caller then reads the key and replays or refuses.
CONFIRM = """WITH changed AS (
    UPDATE orders
    SET status = 'confirmed', total_cents = $4, version = version + 1, updated_at = $5
    WHERE id = $1 AND tenant_id = $2 AND status = 'draft'
      AND ($3::int[] IS NULL OR version = ANY($3::int[]))
    RETURNING version
), claimed AS (
    INSERT INTO idempotency_keys
        (tenant_id, key, request_hash, status_code, response_json, created_at)
    SELECT $2, $6::text, $7, 200,
           jsonb_build_object('id', $1::uuid, 'status', 'confirmed', 'version', version,
                              'totalCents', $4::int),
           $5
    FROM changed WHERE $6::text IS NOT NULL
)
SELECT version FROM changed
"""

CLOSE = """WITH closed AS (
    UPDATE orders
    SET status = 'closed', version = version + 1, updated_at = $4
    WHERE id = $1 AND tenant_id = $2 AND status = 'confirmed'
      AND ($3::int[] IS NULL OR version = ANY($3::int[]))
    RETURNING id, tenant_id, version, total_cents
), event AS (
    INSERT INTO outbox
        (id, event_type, order_id, tenant_id, payload, created_at, next_attempt_at, attempts)
    SELECT $5, 'orders.closed', id, tenant_id,
           jsonb_build_object('orderId', id, 'tenantId', tenant_id,
                              'totalCents', total_cents, 'closedAt', $6::text),
           $4, $4, 0
    FROM closed
), claimed AS (
    INSERT INTO idempotency_keys
        (tenant_id, key, request_hash, status_code, response_json, created_at)
    SELECT $2, $7::text, $8, 200,
           jsonb_build_object('id', id, 'status', 'closed', 'version', version), $4
    FROM closed WHERE $7::text IS NOT NULL
)
SELECT version FROM closed
"""

# Why a change matched nothing, in one round trip: the key as stored (when one was sent) and
# the order as it is now.
EXPLAIN_CHANGE = """SELECT k.request_hash, k.created_at, k.response_json::text, o.version, o.status
FROM (SELECT 1) AS one
LEFT JOIN idempotency_keys AS k ON k.tenant_id = $1 AND k.key = $3
LEFT JOIN orders AS o ON o.id = $2 AND o.tenant_id = $1
"""

# A key past the window is free again: the next request that wants it deletes it first.
FREE_EXPIRED_KEY = (
    "DELETE FROM idempotency_keys WHERE tenant_id = $1 AND key = $2 AND created_at <= $3"
)

# Wakes the relay. Sent after the close committed, in a transaction of its own: a NOTIFY
# inside the close would hold PostgreSQL's database-wide notify lock across the close's
# commit (and its wait for a synchronous standby), serialising every close.
WAKE_RELAY = f"SELECT pg_notify('{NOTIFY_CHANNEL}', '')"

# With synchronous replication on, a commit whose wait for the standby was cancelled is
# visible here but may be lost by a failover. Before a stored response is replayed, a
# transaction of our own waits for the standby to confirm everything before it, the replayed
# rows included; the pool turns a cancelled wait into an error. It must write WAL to wait at
# all (an xid alone does not): a transactional logical-decoding message is the smallest such
# write, and any role may send one. Without synchronous standbys it does nothing.
CONFIRM_REPLICATED = """SELECT CASE WHEN current_setting('synchronous_standby_names') <> ''
    THEN pg_logical_emit_message(true, 'orders-api', 'replicated') END
"""

GET = f"SELECT o.version, {ORDER_DOCUMENT} WHERE o.id = $1 AND o.tenant_id = $2"


def _page(*conditions: str) -> str:
    """A page of orders newest first, on the index that leads with the same columns."""
    return f"""SELECT o.created_at, o.id, {ORDER_DOCUMENT}
WHERE {" AND ".join(("o.tenant_id = $1", *conditions))}
ORDER BY o.created_at DESC, o.id DESC
LIMIT $2
"""


# By status on ix_orders_tenant_status_created_id; unfiltered on ix_orders_tenant_created_id.
_AFTER_CURSOR = "(o.created_at, o.id) < ($3, $4)"
LIST_FIRST_PAGE = _page()
LIST_AFTER_CURSOR = _page(_AFTER_CURSOR)
LIST_FIRST_PAGE_BY_STATUS = _page("o.status = $3")
LIST_AFTER_CURSOR_BY_STATUS = _page(_AFTER_CURSOR, "o.status = $5")


class StoredKey(NamedTuple):
    """A key found already stored: its fingerprint, when it was stored, and its response."""

    request_hash: str
    created_at: datetime
    response: str


class KeyUse(NamedTuple):
    """An Idempotency-Key sent with a change, and the fingerprint of the request."""

    key: str
    request_hash: str


class KeyTaken(Exception):
    """The change's Idempotency-Key is stored already (or was, by the time it committed):
    the change did not happen."""


class ChangeContext(NamedTuple):
    """Why a change matched nothing: the key as stored, and the order as it is now."""

    stored: StoredKey | None
    state: OrderState | None


class KeyRecord(NamedTuple):
    request_hash: str
    created_at: datetime


class OrderState(NamedTuple):
    version: int
    status: str


class OrderDocument(NamedTuple):
    version: int
    json: str  # the order as the API shows it, built by the database


class PageRow(NamedTuple):
    created_at: datetime
    id: uuid.UUID
    json: str


def _versions(expected: Collection[int] | None) -> list[int] | None:
    return None if expected is None else list(expected)


def _key(key: KeyUse | None) -> tuple[str | None, str | None]:
    return (None, None) if key is None else (key.key, key.request_hash)


class OrderStore:
    """The order statements on the pool. Nothing here shapes HTTP; nothing here commits
    more than its one statement."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def claim_key_and_create(
        self,
        tenant_id: str,
        key: str,
        request_hash: str,
        body: bytes,
        order_id: uuid.UUID,
        now: datetime,
        window: timedelta,
    ) -> StoredKey | None:
        """None when this request created the order; else the live key that already holds it."""
        response = body.decode()
        for _ in range(3):
            row = await self.pool.fetchrow(
                CLAIM_KEY_AND_CREATE, tenant_id, key, request_hash, response, now, order_id
            )
            if row is None:
                # The key committed after this statement's snapshot was taken (we waited
                # for it), or was purged meanwhile: a new statement sees which.
                continue
            if row["created"]:
                return None
            if row["stored_at"] > now - window:
                return StoredKey(row["request_hash"], row["stored_at"], row["response"])
            taken = await self.pool.fetchval(
                TAKE_OVER_KEY_AND_CREATE,
                tenant_id,
                key,
                request_hash,
                response,
                now,
                order_id,
                now - window,
            )
            if taken:
                return None
            # Another request took the expired key over first: look again.
        raise request_in_progress()

    async def find_key(self, tenant_id: str, key: str) -> KeyRecord | None:
        row = await self.pool.fetchrow(FIND_KEY, tenant_id, key)
        return None if row is None else KeyRecord(row[0], row[1])

    async def confirm(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        total_cents: int,
        now: datetime,
        key: KeyUse | None = None,
    ) -> int | None:
        """The new version, or None when the conditional UPDATE matched nothing."""
        return await self._change(
            CONFIRM, order_id, tenant_id, _versions(expected), total_cents, now, *_key(key)
        )

    async def close(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        now: datetime,
        closed_at: str,
        key: KeyUse | None = None,
    ) -> int | None:
        """The new version (its outbox row written with it), or None when nothing matched."""
        return await self._change(
            CLOSE,
            order_id,
            tenant_id,
            _versions(expected),
            now,
            uuid.uuid4(),
            closed_at,
            *_key(key),
        )

    async def _change(self, sql: str, *args: object) -> int | None:
        try:
            version: int | None = await self.pool.fetchval(sql, *args)
        except asyncpg.UniqueViolationError as exc:
            if exc.constraint_name != "pk_idempotency_keys":
                raise
            raise KeyTaken() from None
        return version

    async def explain_change(
        self, tenant_id: str, order_id: uuid.UUID, key: str | None
    ) -> ChangeContext:
        row = await self.pool.fetchrow(EXPLAIN_CHANGE, tenant_id, order_id, key)
        stored = None if row[0] is None else StoredKey(row[0], row[1], row[2])
        state = None if row[3] is None else OrderState(row[3], row[4])
        return ChangeContext(stored, state)

    async def free_expired_key(self, tenant_id: str, key: str, cutoff: datetime) -> None:
        await self.pool.execute(FREE_EXPIRED_KEY, tenant_id, key, cutoff)

    async def confirm_replicated(self) -> None:
        """Return once everything committed so far is on the synchronous standbys."""
        await self.pool.execute(CONFIRM_REPLICATED)

    async def wake_relay(self) -> None:
        await self.pool.execute(WAKE_RELAY)

    async def get(self, tenant_id: str, order_id: uuid.UUID) -> OrderDocument | None:
        row = await self.pool.fetchrow(GET, order_id, tenant_id)
        return None if row is None else OrderDocument(row[0], row[1])

    async def list_page(
        self,
        tenant_id: str,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        status: str | None = None,
    ) -> list[PageRow]:
        """Up to `limit` rows, newest first, on the index (in `status` only, when given)."""
        if after is None and status is None:
            rows = await self.pool.fetch(LIST_FIRST_PAGE, tenant_id, limit)
        elif after is None:
            rows = await self.pool.fetch(LIST_FIRST_PAGE_BY_STATUS, tenant_id, limit, status)
        elif status is None:
            rows = await self.pool.fetch(LIST_AFTER_CURSOR, tenant_id, limit, *after)
        else:
            rows = await self.pool.fetch(
                LIST_AFTER_CURSOR_BY_STATUS, tenant_id, limit, *after, status
            )
        return [PageRow(row[0], row[1], row[2]) for row in rows]
