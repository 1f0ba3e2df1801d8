"""GET /orders: keyset pagination with a signed, tenant-bound cursor."""

from __future__ import annotations

import base64
import itertools
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from orders_api.app import create_app
from orders_api.orders.service import iso
from tests.api.support import assert_error, create_order
from tests.helpers import FakeClock, auth, make_settings

ORDER_KEYS = {"id", "tenantId", "status", "version", "totalCents", "createdAt", "updatedAt"}
BASE = datetime(2031, 5, 17, 8, 30, 0, 999_990, tzinfo=UTC)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


async def list_page(
    client: httpx.AsyncClient, tenant: str, cursor: str | None = None, limit: int | None = None
) -> dict[str, Any]:
    params: dict[str, str | int] = {}
    if limit is not None:
        params["limit"] = limit
    if cursor is not None:
        params["cursor"] = cursor
    response = await client.get("/orders", headers=auth(tenant), params=params)
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    assert set(page) == {"items", "nextCursor"}
    return page


async def walk(client: httpx.AsyncClient, tenant: str, limit: int) -> list[list[dict[str, Any]]]:
    """Every page until nextCursor is null (bounded, so a cursor loop fails instead of hanging)."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    for _ in range(1000):
        page = await list_page(client, tenant, cursor, limit)
        pages.append(page["items"])
        cursor = page["nextCursor"]
        if cursor is None:
            return pages
        assert len(page["items"]) == limit, "a page before the end must be full"
    raise AssertionError("pagination did not end")


def sort_key(item: dict[str, Any]) -> tuple[str, uuid.UUID]:
    return item["createdAt"], uuid.UUID(item["id"])


def assert_strictly_newest_first(items: list[dict[str, Any]]) -> None:
    keys = [sort_key(item) for item in items]
    assert all(a > b for a, b in itertools.pairwise(keys)), keys


async def insert_rows(
    db: asyncpg.Pool, tenant: str, created: list[datetime], ids: list[uuid.UUID] | None = None
) -> list[str]:
    """Insert orders directly, all in ONE transaction; returns their ids."""
    ids = ids or [uuid.uuid4() for _ in created]
    async with db.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at,"
            " updated_at) VALUES ($1, $2, 'draft', 1, NULL, $3, $3)",
            [(order_id, tenant, at) for order_id, at in zip(ids, created, strict=True)],
        )
    return [str(order_id) for order_id in ids]


def expected_order(ids: list[str], created: list[datetime]) -> list[tuple[str, str]]:
    pairs = [(iso(at), order_id) for order_id, at in zip(ids, created, strict=True)]
    return sorted(pairs, key=lambda pair: (pair[0], uuid.UUID(pair[1])), reverse=True)


async def test_fifteen_orders_page_as_ten_then_five(client: httpx.AsyncClient, tenant: str) -> None:
    created = {(await create_order(client, tenant))["id"] for _ in range(15)}
    first = await list_page(client, tenant)
    assert len(first["items"]) == 10
    assert isinstance(first["nextCursor"], str)
    second = await list_page(client, tenant, first["nextCursor"])
    assert len(second["items"]) == 5
    assert second["nextCursor"] is None
    items = first["items"] + second["items"]
    ids = [item["id"] for item in items]
    assert len(set(ids)) == 15
    assert set(ids) == created
    assert_strictly_newest_first(items)
    for item in items:
        assert set(item) == ORDER_KEYS
        assert item["tenantId"] == tenant
        assert item["status"] == "draft"


async def test_items_are_full_orders(client: httpx.AsyncClient, tenant: str) -> None:
    order = await create_order(client, tenant)
    single = await client.get(f"/orders/{order['id']}", headers=auth(tenant))
    page = await list_page(client, tenant)
    assert page == {"items": [single.json()], "nextCursor": None}


@pytest.mark.parametrize(
    ("count", "limit", "sizes"),
    [(10, 5, [5, 5]), (10, 10, [10]), (4, 1, [1, 1, 1, 1]), (0, 10, [0]), (3, 100, [3])],
)
async def test_next_cursor_is_null_exactly_at_the_end(
    client: httpx.AsyncClient, tenant: str, count: int, limit: int, sizes: list[int]
) -> None:
    for _ in range(count):
        await create_order(client, tenant)
    pages = await walk(client, tenant, limit)
    assert [len(page) for page in pages] == sizes
    ids = [item["id"] for page in pages for item in page]
    assert len(set(ids)) == count


@pytest.mark.parametrize("limit", [1, 2, 3, 7])
async def test_rows_with_the_same_timestamp_are_each_listed_once(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, limit: int
) -> None:
    created = [BASE] * 7
    ids = await insert_rows(db, tenant, created)
    pages = await walk(client, tenant, limit)
    items = [item for page in pages for item in page]
    assert [(item["createdAt"], item["id"]) for item in items] == expected_order(ids, created)
    assert all(item["createdAt"] == "2031-05-17T08:30:00.999990Z" for item in items)


@pytest.mark.parametrize("limit", [1, 2, 3])
async def test_rows_a_microsecond_apart_straddling_pages_are_each_listed_once(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, limit: int
) -> None:
    # Two rows per instant, instants one microsecond apart, across a second boundary.
    created = [BASE + timedelta(microseconds=step) for step in range(20) for _ in range(2)]
    ids = await insert_rows(db, tenant, created)
    pages = await walk(client, tenant, limit)
    items = [item for page in pages for item in page]
    assert [(item["createdAt"], item["id"]) for item in items] == expected_order(ids, created)
    assert len(pages) == -(-len(created) // limit)
    assert items[0]["createdAt"] == "2031-05-17T08:30:01.000009Z"
    assert items[-1]["createdAt"] == "2031-05-17T08:30:00.999990Z"


async def test_orders_created_while_paging_cause_no_duplicate_or_skip(
    client: httpx.AsyncClient, tenant: str
) -> None:
    original = [(await create_order(client, tenant))["id"] for _ in range(7)]
    seen: list[str] = []
    page = await list_page(client, tenant, limit=3)
    while True:
        seen += [item["id"] for item in page["items"]]
        for _ in range(2):
            await create_order(client, tenant)
        if page["nextCursor"] is None:
            break
        page = await list_page(client, tenant, page["nextCursor"], limit=3)
    assert seen == list(reversed(original))


async def test_rows_inserted_behind_the_cursor_are_listed_later(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    """A row committed mid-walk, older than the cursor, is still reached; none comes twice."""
    created = [BASE + timedelta(seconds=step) for step in range(4)]
    ids = await insert_rows(db, tenant, created)
    first = await list_page(client, tenant, limit=2)
    late = [BASE - timedelta(seconds=1), BASE + timedelta(seconds=10)]
    late_ids = await insert_rows(db, tenant, late)
    rest = await walk_from(client, tenant, first["nextCursor"], limit=2)
    seen = [item["id"] for item in first["items"] + rest]
    assert seen == [ids[3], ids[2], ids[1], ids[0], late_ids[0]]


async def walk_from(
    client: httpx.AsyncClient, tenant: str, cursor: str | None, limit: int
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    while cursor is not None:
        page = await list_page(client, tenant, cursor, limit)
        items += page["items"]
        cursor = page["nextCursor"]
    return items


async def a_cursor(client: httpx.AsyncClient, tenant: str) -> str:
    for _ in range(3):
        await create_order(client, tenant)
    cursor = (await list_page(client, tenant, limit=1))["nextCursor"]
    assert isinstance(cursor, str)
    return cursor


async def assert_cursor_rejected(client: httpx.AsyncClient, tenant: str, cursor: str) -> None:
    response = await client.get("/orders", headers=auth(tenant), params={"cursor": cursor})
    assert_error(response, 400, "validation_error")


async def test_cursor_is_opaque_base64url(client: httpx.AsyncClient, tenant: str) -> None:
    cursor = await a_cursor(client, tenant)
    assert set(cursor) <= set(B64URL)
    base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))


async def test_every_flipped_character_is_rejected(client: httpx.AsyncClient, tenant: str) -> None:
    cursor = await a_cursor(client, tenant)
    for position, char in enumerate(cursor):
        # Flip the lowest bit of the character's 6-bit value (also the padding bits at the end).
        flipped = B64URL[B64URL.index(char) ^ 1]
        await assert_cursor_rejected(
            client, tenant, cursor[:position] + flipped + cursor[position + 1 :]
        )


async def test_non_canonical_spellings_are_rejected(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    # Id bytes 0xfb encode as "-_v7": the cursor surely holds characters with a +/ twin.
    ids = [uuid.UUID(bytes=b"\xfb" * 12 + uuid.uuid4().bytes[:4]) for _ in range(2)]
    await insert_rows(db, tenant, [BASE, BASE], ids)
    cursor = (await list_page(client, tenant, limit=1))["nextCursor"]
    assert "-_" in cursor
    variants = [
        cursor + "=",
        cursor + "==",
        cursor.replace("-", "+").replace("_", "/"),
        cursor[:10] + "!" + cursor[11:],
        cursor[:10] + " " + cursor[11:],
        cursor[:10] + "\n" + cursor[11:],
        " " + cursor[1:],
    ]
    for variant in variants:
        if variant != cursor:
            await assert_cursor_rejected(client, tenant, variant)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda c: c[:-1],
        lambda c: c[:20],
        lambda c: c + "A",
        lambda c: c + c,
        lambda c: "",
        lambda c: "garbage",
        lambda c: "A" * 54,
        lambda c: "%%%%",
        lambda c: "x" * 300,
        lambda c: base64.urlsafe_b64encode(b"\xff" * 40).decode().rstrip("="),
        lambda c: base64.urlsafe_b64encode(b"\x7f" + b"\xff" * 39).decode().rstrip("="),
    ],
)
async def test_malformed_cursors_are_rejected(
    client: httpx.AsyncClient, tenant: str, mangle: Any
) -> None:
    cursor = await a_cursor(client, tenant)
    await assert_cursor_rejected(client, tenant, mangle(cursor))


async def test_another_tenants_cursor_is_rejected(client: httpx.AsyncClient, tenant: str) -> None:
    cursor = await a_cursor(client, tenant)
    other = tenant + "-other"
    await create_order(client, other)
    await assert_cursor_rejected(client, other, cursor)
    # ... while it still works for its own tenant.
    assert len((await list_page(client, tenant, cursor))["items"]) == 2


@pytest.mark.parametrize("limit", ["0", "101", "abc", "-1", "1.5", "", "1e1"])
async def test_bad_limits_are_rejected(client: httpx.AsyncClient, tenant: str, limit: str) -> None:
    response = await client.get("/orders", headers=auth(tenant), params={"limit": limit})
    assert_error(response, 400, "validation_error")


async def test_limit_bounds_are_accepted(client: httpx.AsyncClient, tenant: str) -> None:
    for _ in range(2):
        await create_order(client, tenant)
    assert len((await list_page(client, tenant, limit=1))["items"]) == 1
    assert len((await list_page(client, tenant, limit=100))["items"]) == 2


@pytest.fixture
async def second_app(database_url: str) -> AsyncIterator[ASGIApp]:
    """Another app instance on the same database: another worker, or the service restarted."""
    async with LifespanManager(
        create_app(make_settings(database_url), clock=FakeClock())
    ) as manager:
        yield manager.app


async def test_cursor_works_on_another_app_instance(
    client: httpx.AsyncClient, second_app: ASGIApp, tenant: str
) -> None:
    for _ in range(5):
        await create_order(client, tenant)
    first = await list_page(client, tenant, limit=2)
    transport = httpx.ASGITransport(app=second_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as other:
        on_other = await list_page(other, tenant, first["nextCursor"], limit=2)
        assert (await list_page(other, tenant, limit=2))["nextCursor"] == first["nextCursor"]
    on_same = await list_page(client, tenant, first["nextCursor"], limit=2)
    assert on_other == on_same
    assert len(on_other["items"]) == 2


async def test_cursor_signed_with_another_secret_is_rejected(
    client: httpx.AsyncClient, database_url: str, tenant: str
) -> None:
    for _ in range(3):
        await create_order(client, tenant)
    foreign = create_app(make_settings(database_url, cursor_secret="another-secret"))
    async with LifespanManager(foreign) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as other:
            cursor = (await list_page(other, tenant, limit=1))["nextCursor"]
            assert len((await list_page(other, tenant, cursor, limit=5))["items"]) == 2
    await assert_cursor_rejected(client, tenant, cursor)
