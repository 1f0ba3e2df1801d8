"""Order use cases: each is one transaction, usually one statement (see orders/store.py).

Responses leave here encoded, once: the database builds an order's JSON, and the create
response is the very document stored with the idempotency key.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

import orjson

from orders_api.errors import Conflict, NotFound, ValidationFailed, request_in_progress
from orders_api.orders.store import (
    ChangeContext,
    KeyRecord,
    KeyTaken,
    KeyUse,
    OrderDocument,
    OrderState,
    PageRow,
    StoredKey,
)
from orders_api.pagination import CursorSecret, InvalidCursor, decode_cursor, encode_cursor

# The fields of each stored response, in the order they were sent (jsonb does not keep it).
CREATED_FIELDS = ("id", "tenantId", "status", "version", "createdAt")

Clock = Callable[[], datetime]


class Store(Protocol):
    """What the use cases need of the database (OrderStore; a fake in service tests)."""

    async def claim_key_and_create(
        self,
        tenant_id: str,
        key: str,
        request_hash: str,
        body: bytes,
        order_id: uuid.UUID,
        now: datetime,
        window: timedelta,
    ) -> StoredKey | None: ...

    async def find_key(self, tenant_id: str, key: str) -> KeyRecord | None: ...

    async def confirm(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        total_cents: int,
        now: datetime,
        key: KeyUse | None = None,
    ) -> int | None: ...

    async def close(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        now: datetime,
        closed_at: str,
        key: KeyUse | None = None,
    ) -> int | None: ...

    async def explain_change(
        self, tenant_id: str, order_id: uuid.UUID, key: str | None
    ) -> ChangeContext: ...

    async def free_expired_key(self, tenant_id: str, key: str, cutoff: datetime) -> None: ...

    async def confirm_replicated(self) -> None: ...

    async def get(self, tenant_id: str, order_id: uuid.UUID) -> OrderDocument | None: ...

    async def list_page(
        self,
        tenant_id: str,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        status: str | None = None,
    ) -> list[PageRow]: ...


@dataclass(frozen=True, slots=True)
class Created:
    body: bytes
    order_id: str
    replayed: bool


@dataclass(frozen=True, slots=True)
class Encoded:
    """A response body, encoded once, and the order version for its ETag."""

    body: bytes
    version: int
    replayed: bool = False


def iso(value: datetime) -> str:
    """ISO 8601 UTC with microseconds, always six digits."""
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def key_reused(what: str = "request body") -> Conflict:
    return Conflict(
        f"Idempotency-Key was already used with a different {what}",
        {"reason": "idempotency_key_reused"},
    )


def _stored_response(stored: StoredKey, fields: tuple[str, ...]) -> tuple[bytes, Any]:
    """The stored response re-encoded in the order it was sent, and its document."""
    document = orjson.loads(stored.response)
    return orjson.dumps({name: document[name] for name in fields}), document


def _failed_change(current: OrderState | None, expected: Collection[int] | None) -> Exception:
    """After a conditional UPDATE matched nothing, the row tells 404, stale or bad state."""
    if current is None:
        return NotFound("order not found")
    if expected is not None and current.version not in expected:
        return Conflict(
            "stale version",
            {"reason": "stale_version", "currentVersion": current.version},
            headers={"ETag": f'"{current.version}"'},
        )
    return Conflict(
        f"order is {current.status}",
        {"reason": "invalid_transition", "currentStatus": current.status},
    )


class OrderService:
    """The order use cases, built once in the lifespan; nothing in it changes per request."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        idempotency_window: timedelta,
        cursor_secret: CursorSecret,
        wake_relay: Callable[[], None],
    ) -> None:
        self.store = store
        self.clock = clock
        self.idempotency_window = idempotency_window
        self.cursor_secret = cursor_secret
        self.wake_relay = wake_relay

    async def create(self, tenant_id: str, key: str, request_hash: str) -> Created:
        """Create a draft once per (tenant, key); later requests with the key replay it."""
        now = self.clock()
        order_id = uuid.uuid4()
        document: dict[str, Any] = {
            "id": str(order_id),
            "tenantId": tenant_id,
            "status": "draft",
            "version": 1,
            "createdAt": iso(now),
        }
        body = orjson.dumps(document)
        found = await self.store.claim_key_and_create(
            tenant_id, key, request_hash, body, order_id, now, self.idempotency_window
        )
        if found is None:
            return Created(body, str(order_id), replayed=False)
        if found.request_hash != request_hash:
            raise key_reused()
        await self.store.confirm_replicated()
        replay, document = _stored_response(found, CREATED_FIELDS)
        return Created(replay, str(document["id"]), replayed=True)

    async def key_in_use(self, tenant_id: str, key: str, request_hash: str) -> bool:
        """For a body that fails validation: is the key stored for another request (409 first)?"""
        found = await self.store.find_key(tenant_id, key)
        return (
            found is not None
            and found.created_at > self.clock() - self.idempotency_window
            and found.request_hash != request_hash
        )

    async def confirm(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        total_cents: int,
        key: KeyUse | None = None,
    ) -> Encoded:
        """draft -> confirmed with the total, if the version is one of `expected` (None: any)."""

        async def change(now: datetime) -> int | None:
            return await self.store.confirm(tenant_id, order_id, expected, total_cents, now, key)

        def answer(version: int) -> dict[str, Any]:
            body = {"id": str(order_id), "status": "confirmed", "version": version}
            return {**body, "totalCents": total_cents}

        return await self._change(tenant_id, order_id, expected, key, change, answer)

    async def close(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        key: KeyUse | None = None,
    ) -> Encoded:
        """confirmed -> closed and its orders.closed outbox row, in one transaction."""

        async def change(now: datetime) -> int | None:
            return await self.store.close(tenant_id, order_id, expected, now, iso(now), key)

        def answer(version: int) -> dict[str, Any]:
            return {"id": str(order_id), "status": "closed", "version": version}

        result = await self._change(tenant_id, order_id, expected, key, change, answer)
        if not result.replayed:
            self.wake_relay()
        return result

    async def _change(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        key: KeyUse | None,
        change: Callable[[datetime], Awaitable[int | None]],
        answer: Callable[[int], dict[str, Any]],
    ) -> Encoded:
        """The answer to a change that happened (`answer` of the new version); or, for a key
        already used by this very request, its stored answer; else the error that explains
        why nothing changed.

        A failed change stores nothing, so its key stays free; a key past the window is
        freed and the change tried once more.
        """
        for _ in range(3):
            now = self.clock()
            taken = False
            try:
                version = await change(now)
            except KeyTaken:
                version, taken = None, True
            if version is not None:
                return Encoded(orjson.dumps(answer(version)), version)
            context = await self.store.explain_change(
                tenant_id, order_id, None if key is None else key.key
            )
            stored = context.stored
            if stored is None or key is None:
                if taken:  # the key's holder was purged meanwhile: the key is free now
                    continue
                raise _failed_change(context.state, expected)
            cutoff = now - self.idempotency_window
            if stored.created_at <= cutoff:
                await self.store.free_expired_key(tenant_id, key.key, cutoff)
                continue
            if stored.request_hash != key.request_hash:
                raise key_reused("request (operation, order, body or If-Match)")
            await self.store.confirm_replicated()
            # The stored answer has the fields `answer` gives, in that order.
            replay, document = _stored_response(stored, tuple(answer(0)))
            return Encoded(replay, int(document["version"]), replayed=True)
        raise request_in_progress()

    async def get(self, tenant_id: str, order_id: uuid.UUID) -> Encoded:
        found = await self.store.get(tenant_id, order_id)
        if found is None:
            raise NotFound("order not found")
        return Encoded(found.json.encode(), found.version)

    async def list_page(
        self, tenant_id: str, limit: int, cursor: str | None, status: str | None = None
    ) -> bytes:
        """One page, newest first, and the cursor after its last row (null on the last page).

        A cursor is bound to its tenant and to the status filter of the pages it came from.
        """
        secret = await self.cursor_secret.get()
        after = None
        if cursor is not None:
            try:
                after = decode_cursor(secret, tenant_id, cursor, status)
            except InvalidCursor as exc:
                raise ValidationFailed(str(exc)) from None
        rows = await self.store.list_page(tenant_id, limit + 1, after, status)
        items = ",".join(row.json for row in rows[:limit])
        next_cursor = "null"
        if len(rows) > limit:
            last = rows[limit - 1]
            cursor = encode_cursor(secret, tenant_id, last.created_at, last.id, status)
            next_cursor = f'"{cursor}"'
        return f'{{"items":[{items}],"nextCursor":{next_cursor}}}'.encode()
