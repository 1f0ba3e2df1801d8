"""Idempotency keys: request fingerprint, claim-or-replay inside the create transaction, purge.

States of a key (tenant_id, key):
  absent   -> the request that inserts the row owns the key; the row, the order and the
              stored response commit together, so a failed request leaves the key absent;
  present  -> within the window: same fingerprint replays the stored response, another
              fingerprint is a 409; past the window: the row is taken over as if absent.
A second request that arrives while the first is in flight blocks on the row (the unique
index) until the first commits, then replays. The wait is bounded by the lock timeout, which
answers 409 request_in_progress.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Any

import orjson

from orders_api.pool import Pool


def fingerprint(body: Any) -> str:
    """SHA-256 of the canonical JSON of the parsed body: key order and whitespace don't count."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()


def change_fingerprint(
    operation: str, order_id: uuid.UUID, expected: Collection[int] | None, body: Any
) -> str:
    """A confirm's or close's fingerprint: the operation, the order, the versions If-Match
    accepts (None: any) and the body. A key is bound to all four."""
    versions = None if expected is None else sorted(expected)
    return fingerprint(
        {"operation": operation, "order": str(order_id), "ifMatch": versions, "body": body}
    )


# Oldest first, a batch at a time, skipping rows a request holds: no transaction grows large
# and none waits.
_PURGE_BATCH = """DELETE FROM idempotency_keys
WHERE (tenant_id, key) IN (
    SELECT tenant_id, key FROM idempotency_keys
    WHERE created_at < $1
    ORDER BY created_at
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
"""


async def purge_expired_keys(
    pool: Pool, window: timedelta, now: datetime, batch_size: int = 5000
) -> int:
    """Delete keys older than the window; the number deleted."""
    cutoff = now - window
    removed = 0
    while True:
        status = await pool.execute(_PURGE_BATCH, cutoff, batch_size)
        deleted = int(status.rsplit(" ", 1)[-1])
        removed += deleted
        if deleted < batch_size:
            return removed
