"""Idempotency keys: request fingerprint, claim-or-replay inside the create transaction, purge.

States of a key (tenant_id, key):
  absent   -> the request that inserts the row owns the key; the row, the order and the
              stored response commit together, so a failed request leaves the key absent;
  present  -> within the window: same fingerprint replays the stored response, another
              fingerprint is a 409; past the window: the row is taken over as if absent.
A second request that arrives while the first is in flight blocks on the row (PostgreSQL:
the unique index; SQLite: the database write lock) until the first commits, then replays.
The wait is bounded by the lock / busy timeout, which answers 409 request_in_progress / 503.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import delete, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from orders_api.db import idempotency_keys

KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")


def fingerprint(body: Any) -> str:
    """SHA-256 of the canonical JSON of the parsed body: key order and whitespace don't count."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredResponse:
    request_hash: str
    status_code: int
    body: dict[str, Any]
    created_at: datetime


async def find_key(
    conn: AsyncConnection, tenant_id: str, key: str, *, for_update: bool = False
) -> StoredResponse | None:
    stmt = select(
        idempotency_keys.c.request_hash,
        idempotency_keys.c.status_code,
        idempotency_keys.c.response_json,
        idempotency_keys.c.created_at,
    ).where(idempotency_keys.c.tenant_id == tenant_id, idempotency_keys.c.key == key)
    if for_update:
        stmt = stmt.with_for_update()
    row = (await conn.execute(stmt)).first()
    if row is None:
        return None
    return StoredResponse(row.request_hash, row.status_code, row.response_json, row.created_at)


async def purge_expired_keys(
    engine: AsyncEngine, window: timedelta, now: datetime, batch_size: int = 5000
) -> int:
    """Delete keys older than the window in batches, so no transaction grows large."""
    cutoff = now - window
    removed = 0
    while True:
        async with engine.begin() as conn:
            batch = (
                select(idempotency_keys.c.tenant_id, idempotency_keys.c.key)
                .where(idempotency_keys.c.created_at < cutoff)
                .limit(batch_size)
            )
            if conn.dialect.name == "postgresql":
                batch = batch.with_for_update(skip_locked=True)
            result = await conn.execute(
                delete(idempotency_keys).where(
                    tuple_(idempotency_keys.c.tenant_id, idempotency_keys.c.key).in_(batch),
                    idempotency_keys.c.created_at < cutoff,
                )
            )
        removed += result.rowcount
        if result.rowcount < batch_size:
            return removed
