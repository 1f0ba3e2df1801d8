"""OrderService on a fake store: what the API tests cannot show easily.

The fake implements the Store protocol with answers the test sets, and records what the
service asked of it.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import orjson
import pytest

from orders_api.errors import Conflict, NotFound, ValidationFailed
from orders_api.orders.service import OrderService
from orders_api.orders.store import (
    ChangeContext,
    KeyRecord,
    KeyUse,
    OrderDocument,
    OrderState,
    PageRow,
    StoredKey,
)
from orders_api.pagination import CursorSecret, decode_cursor
from orders_api.pool import Pool

NOW = datetime(2031, 5, 17, 8, 30, 0, 123_456, tzinfo=UTC)
WINDOW = timedelta(hours=1)
SECRET = b"service-test-secret"
TENANT = "t-service"


class FakeStore:
    """The Store protocol, answering what the test put in its fields."""

    def __init__(self) -> None:
        self.claimed: list[bytes] = []  # bodies the service asked to store with a new key
        self.stored_key: StoredKey | None = None  # claim_key_and_create finds this key
        self.key_record: KeyRecord | None = None
        self.context = ChangeContext(stored=None, state=None)
        self.rows: list[PageRow] = []
        self.page_requests: list[tuple[int, tuple[datetime, uuid.UUID] | None]] = []

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
        if self.stored_key is not None:
            return self.stored_key
        self.claimed.append(body)
        return None

    async def find_key(self, tenant_id: str, key: str) -> KeyRecord | None:
        return self.key_record

    async def confirm(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        total_cents: int,
        now: datetime,
        key: KeyUse | None = None,
    ) -> int | None:
        return None  # the conditional UPDATE matched nothing: explain_change tells why

    async def close(
        self,
        tenant_id: str,
        order_id: uuid.UUID,
        expected: Collection[int] | None,
        now: datetime,
        closed_at: str,
        key: KeyUse | None = None,
    ) -> int | None:
        return None

    async def explain_change(
        self, tenant_id: str, order_id: uuid.UUID, key: str | None
    ) -> ChangeContext:
        return self.context

    async def free_expired_key(self, tenant_id: str, key: str, cutoff: datetime) -> None:
        raise AssertionError("no key expires in these tests")

    async def confirm_replicated(self) -> None:
        return None

    async def get(self, tenant_id: str, order_id: uuid.UUID) -> OrderDocument | None:
        return None

    async def list_page(
        self,
        tenant_id: str,
        limit: int,
        after: tuple[datetime, uuid.UUID] | None,
        status: str | None = None,
    ) -> list[PageRow]:
        self.page_requests.append((limit, after))
        return self.rows[:limit]


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def make_service(store: FakeStore, clock: Clock | None = None) -> OrderService:
    secret = CursorSecret(cast(Pool, None), SECRET.decode())  # configured: no database read
    return OrderService(store, clock or Clock(), WINDOW, secret, wake_relay=lambda: None)


def as_jsonb(body: bytes) -> str:
    """The text PostgreSQL gives back for a jsonb: keys shortest first, then bytewise."""
    document = orjson.loads(body)
    ordered = {key: document[key] for key in sorted(document, key=lambda k: (len(k), k))}
    return orjson.dumps(ordered).decode()


# -- replays ------------------------------------------------------------------------------


async def test_a_create_replay_is_the_original_body_byte_for_byte() -> None:
    store = FakeStore()
    service = make_service(store)
    first = await service.create(TENANT, "k", "hash")
    assert not first.replayed
    assert store.claimed == [first.body]
    stored = as_jsonb(first.body)
    assert stored.encode() != first.body  # jsonb really does reorder these keys

    store.stored_key = StoredKey("hash", NOW, stored)
    replay = await service.create(TENANT, "k", "hash")
    assert replay.replayed
    assert replay.body == first.body
    assert replay.order_id == first.order_id


async def test_a_create_with_the_key_of_another_body_is_a_conflict() -> None:
    store = FakeStore()
    store.stored_key = StoredKey("other-hash", NOW, '{"id": "x"}')
    with pytest.raises(Conflict) as raised:
        await make_service(store).create(TENANT, "k", "hash")
    assert raised.value.details == {"reason": "idempotency_key_reused"}


async def test_a_confirm_replay_is_the_stored_body_in_the_order_it_was_sent() -> None:
    order_id = uuid.uuid4()
    sent = orjson.dumps({"id": str(order_id), "status": "confirmed", "version": 2, "totalCents": 7})
    store = FakeStore()
    store.context = ChangeContext(
        stored=StoredKey("hash", NOW - timedelta(minutes=5), as_jsonb(sent)),
        state=OrderState(version=3, status="closed"),  # the order moved on since
    )
    replay = await make_service(store).confirm(TENANT, order_id, {1}, 7, KeyUse("k", "hash"))
    assert replay.replayed
    assert replay.body == sent
    assert replay.version == 2  # the ETag of the original response, not the order's now


# -- the idempotency window ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("age", "in_use"),
    [
        (timedelta(0), True),
        (WINDOW - timedelta(microseconds=1), True),
        (WINDOW, False),  # the window is over: the key is free again
        (WINDOW + timedelta(microseconds=1), False),
    ],
)
async def test_key_in_use_honours_the_window_to_the_microsecond(
    age: timedelta, in_use: bool
) -> None:
    store = FakeStore()
    store.key_record = KeyRecord("other-hash", NOW - age)
    service = make_service(store, Clock(NOW))
    assert await service.key_in_use(TENANT, "k", "hash") is in_use
    assert await service.key_in_use(TENANT, "k", "other-hash") is False  # the same request


async def test_an_unknown_key_is_not_in_use() -> None:
    assert await make_service(FakeStore()).key_in_use(TENANT, "k", "hash") is False


# -- why a change failed ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "expected", "reason"),
    [
        # A stale version answers before the wrong state ...
        (OrderState(2, "confirmed"), {1}, {"reason": "stale_version", "currentVersion": 2}),
        (OrderState(3, "closed"), {1, 2}, {"reason": "stale_version", "currentVersion": 3}),
        # ... the wrong state when the version matches or none was asked for.
        (
            OrderState(2, "confirmed"),
            {2},
            {"reason": "invalid_transition", "currentStatus": "confirmed"},
        ),
        (
            OrderState(3, "closed"),
            None,
            {"reason": "invalid_transition", "currentStatus": "closed"},
        ),
        # A tag that names no version matches no version.
        (OrderState(1, "draft"), set(), {"reason": "stale_version", "currentVersion": 1}),
    ],
)
async def test_a_failed_confirm_reports_stale_before_invalid_transition(
    state: OrderState, expected: set[int] | None, reason: dict[str, Any]
) -> None:
    store = FakeStore()
    store.context = ChangeContext(stored=None, state=state)
    with pytest.raises(Conflict) as raised:
        await make_service(store).confirm(TENANT, uuid.uuid4(), expected, 100)
    assert raised.value.details == reason


async def test_a_failed_change_on_a_missing_order_is_not_found() -> None:
    with pytest.raises(NotFound):
        await make_service(FakeStore()).close(TENANT, uuid.uuid4(), {1})


# -- pages --------------------------------------------------------------------------------


def rows(count: int) -> list[PageRow]:
    """Rows newest first, one microsecond apart."""
    result = []
    for n in range(count):
        order_id = uuid.uuid4()
        result.append(PageRow(NOW - timedelta(microseconds=n), order_id, f'{{"n":{n}}}'))
    return result


@pytest.mark.parametrize("available", [0, 2, 3])
async def test_a_page_asks_for_one_row_more_and_has_no_cursor_without_it(available: int) -> None:
    store = FakeStore()
    store.rows = rows(available)
    page = orjson.loads(await make_service(store).list_page(TENANT, 3, None))
    assert store.page_requests == [(4, None)]
    assert page == {"items": [{"n": n} for n in range(available)], "nextCursor": None}


async def test_the_extra_row_gives_a_cursor_after_the_last_row_shown() -> None:
    store = FakeStore()
    store.rows = rows(5)
    service = make_service(store)
    page = orjson.loads(await service.list_page(TENANT, 3, None))
    assert page["items"] == [{"n": 0}, {"n": 1}, {"n": 2}]  # the fourth row is not shown
    last = store.rows[2]
    assert decode_cursor(SECRET, TENANT, page["nextCursor"]) == (last.created_at, last.id)

    await service.list_page(TENANT, 3, page["nextCursor"])
    assert store.page_requests[-1] == (4, (last.created_at, last.id))


async def test_a_cursor_of_another_tenant_never_reaches_the_store() -> None:
    store = FakeStore()
    store.rows = rows(5)
    service = make_service(store)
    cursor = orjson.loads(await service.list_page(TENANT, 2, None))["nextCursor"]
    with pytest.raises(ValidationFailed):
        await service.list_page("another-tenant", 2, cursor)
    assert len(store.page_requests) == 1
