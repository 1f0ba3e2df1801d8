"""GET /orders?status=: keyset pages of one status, a cursor bound to its filter, on its index."""

from __future__ import annotations

import asyncio
import itertools
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from orders_api.orders.store import LIST_AFTER_CURSOR_BY_STATUS, LIST_FIRST_PAGE_BY_STATUS
from tests.api.support import assert_error, confirm_order, create_order
from tests.helpers import auth

STATUSES = ("draft", "confirmed", "closed")
STATUS_INDEX = "ix_orders_tenant_status_created_id"
BASE = datetime(2030, 3, 9, 12, 0, 0, 500_000, tzinfo=UTC)
VERSION = {"draft": 1, "confirmed": 2, "closed": 3}


async def insert(
    db: asyncpg.Pool, tenant: str, rows: list[tuple[datetime, str]]
) -> list[dict[str, Any]]:
    """Orders written directly (one transaction): [{id, status, createdAt}] in input order."""
    made = [(uuid.uuid4(), at, status) for at, status in rows]
    async with db.acquire() as conn, conn.transaction():
        await conn.executemany(
            "INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at,"
            " updated_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
            [
                (order_id, tenant, status, VERSION[status], None if status == "draft" else 100, at)
                for order_id, at, status in made
            ],
        )
    return [{"id": str(order_id), "status": status, "at": at} for order_id, at, status in made]


def newest_first(orders: list[dict[str, Any]]) -> list[str]:
    ordered = sorted(orders, key=lambda o: (o["at"], uuid.UUID(o["id"])), reverse=True)
    return [o["id"] for o in ordered]


async def page(
    client: httpx.AsyncClient,
    tenant: str,
    status: str | None = None,
    cursor: str | None = None,
    limit: int | None = None,
) -> dict[str, Any]:
    params: dict[str, str | int] = {}
    if status is not None:
        params["status"] = status
    if cursor is not None:
        params["cursor"] = cursor
    if limit is not None:
        params["limit"] = limit
    response = await client.get("/orders", headers=auth(tenant), params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"items", "nextCursor"}
    return body


async def walk(
    client: httpx.AsyncClient, tenant: str, status: str | None, limit: int
) -> list[list[dict[str, Any]]]:
    """Every page until nextCursor is null; a page before the end is full."""
    pages: list[list[dict[str, Any]]] = []
    cursor = None
    for _ in range(500):
        body = await page(client, tenant, status, cursor, limit)
        pages.append(body["items"])
        cursor = body["nextCursor"]
        if cursor is None:
            return pages
        assert len(body["items"]) == limit, "a page before the last must be full"
    raise AssertionError("pagination did not end")


def sort_key(item: dict[str, Any]) -> tuple[str, uuid.UUID]:
    return item["createdAt"], uuid.UUID(item["id"])


def assert_strictly_newest_first(items: list[dict[str, Any]]) -> None:
    keys = [sort_key(item) for item in items]
    assert all(a > b for a, b in itertools.pairwise(keys)), keys


# --- what the filter returns -----------------------------------------------------------------


async def test_each_status_lists_only_its_orders_newest_first(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    # 3 closed, 4 confirmed, 5 draft, interleaved in time
    pattern = ["draft", "confirmed", "closed", "draft", "draft", "confirmed"] * 2
    rows = await insert(
        db, tenant, [(BASE + timedelta(seconds=i), s) for i, s in enumerate(pattern)]
    )
    for status in STATUSES:
        expected = newest_first([r for r in rows if r["status"] == status])
        pages = await walk(client, tenant, status, limit=2)
        items = [item for p in pages for item in p]
        assert [item["id"] for item in items] == expected
        assert {item["status"] for item in items} == {status}
        assert all(item["tenantId"] == tenant for item in items)
        assert_strictly_newest_first(items)
    # unfiltered: every order
    everything = [item for p in await walk(client, tenant, None, limit=5) for item in p]
    assert [item["id"] for item in everything] == newest_first(rows)


async def test_filter_on_orders_made_through_the_api(
    client: httpx.AsyncClient, tenant: str
) -> None:
    orders = [await create_order(client, tenant) for _ in range(6)]
    for order in orders[:4]:
        await confirm_order(client, tenant, order["id"])
    for order in orders[:2]:
        response = await client.post(f"/orders/{order['id']}/close", headers=auth(tenant))
        assert response.status_code == 200
    ids = [order["id"] for order in orders][::-1]  # newest first
    by_status = {
        "closed": [i for i in ids if i in {o["id"] for o in orders[:2]}],
        "confirmed": [i for i in ids if i in {o["id"] for o in orders[2:4]}],
        "draft": [i for i in ids if i in {o["id"] for o in orders[4:]}],
    }
    for status, expected in by_status.items():
        body = await page(client, tenant, status)
        assert [item["id"] for item in body["items"]] == expected
        assert body["nextCursor"] is None
        for item in body["items"]:
            assert item["version"] == VERSION[status]
            assert (item["totalCents"] is None) == (status == "draft")


@pytest.mark.parametrize(("count", "limit"), [(4, 2), (5, 2), (3, 3), (1, 1), (6, 4)])
async def test_next_cursor_is_null_exactly_at_the_end(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, count: int, limit: int
) -> None:
    rows: list[tuple[datetime, str]] = []
    for i in range(count):
        rows.append((BASE + timedelta(minutes=i), "confirmed"))
        rows.append((BASE + timedelta(minutes=i, seconds=1), "draft"))  # never in the list
    made = await insert(db, tenant, rows)
    pages = await walk(client, tenant, "confirmed", limit)
    sizes = [len(p) for p in pages]
    full, rest = divmod(count, limit)
    assert sizes == [limit] * full + ([rest] if rest else [])
    seen = [item["id"] for p in pages for item in p]
    assert seen == newest_first([r for r in made if r["status"] == "confirmed"])


async def test_an_empty_status_answers_an_empty_last_page(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    await insert(db, tenant, [(BASE, "draft"), (BASE + timedelta(seconds=1), "confirmed")])
    assert await page(client, tenant, "closed") == {"items": [], "nextCursor": None}
    assert await page(client, f"{tenant}-none", "draft") == {"items": [], "nextCursor": None}


async def test_other_tenants_orders_are_not_listed(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    mine = await insert(db, tenant, [(BASE + timedelta(seconds=i), "draft") for i in range(3)])
    await insert(db, f"{tenant}-x", [(BASE + timedelta(seconds=i), "draft") for i in range(3)])
    items = [item for p in await walk(client, tenant, "draft", 2) for item in p]
    assert [item["id"] for item in items] == newest_first(mine)


async def test_rows_sharing_a_timestamp_are_each_listed_once(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    statuses = ["draft", "closed", "draft", "confirmed", "draft", "draft", "closed", "draft"]
    made = await insert(db, tenant, [(BASE, s) for s in statuses])
    drafts = [r for r in made if r["status"] == "draft"]
    for limit in (1, 2, 3):
        items = [item for p in await walk(client, tenant, "draft", limit) for item in p]
        assert [item["id"] for item in items] == newest_first(drafts)  # id DESC within the tie


async def test_rows_a_microsecond_apart_straddle_pages(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    micro = timedelta(microseconds=1)
    made = await insert(
        db,
        tenant,
        [
            (BASE, "closed"),
            (BASE + micro, "closed"),
            (BASE + 2 * micro, "confirmed"),
            (BASE - micro, "closed"),
            (BASE + micro, "draft"),
        ],
    )
    items = [item for p in await walk(client, tenant, "closed", 1) for item in p]
    assert [item["id"] for item in items] == newest_first(
        [r for r in made if r["status"] == "closed"]
    )


# --- refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "status", ["open", "DRAFT", "Draft", "draft ", "", "draft,closed", "cancelled", "1"]
)
async def test_unknown_status_is_a_400(client: httpx.AsyncClient, tenant: str, status: str) -> None:
    response = await client.get("/orders", headers=auth(tenant), params={"status": status})
    body = assert_error(response, 400, "validation_error")
    assert "status" in json.dumps(body)


async def cursor_of(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, status: str | None
) -> str:
    await insert(db, tenant, [(BASE + timedelta(seconds=i), s) for i, s in enumerate(STATUSES * 2)])
    body = await page(client, tenant, status, limit=1)
    assert body["nextCursor"] is not None
    cursor: str = body["nextCursor"]
    return cursor


@pytest.mark.parametrize("used_with", [None, "confirmed", "closed"])
async def test_a_filtered_cursor_only_works_with_its_filter(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, used_with: str | None
) -> None:
    cursor = await cursor_of(client, db, tenant, "draft")
    params = {"cursor": cursor, **({"status": used_with} if used_with else {})}
    response = await client.get("/orders", headers=auth(tenant), params=params)
    assert_error(response, 400, "validation_error")
    # with its own filter it works
    body = await page(client, tenant, "draft", cursor, limit=1)
    assert [item["status"] for item in body["items"]] == ["draft"]
    assert body["nextCursor"] is None


@pytest.mark.parametrize("used_with", STATUSES)
async def test_an_unfiltered_cursor_does_not_work_with_a_filter(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, used_with: str
) -> None:
    cursor = await cursor_of(client, db, tenant, None)
    response = await client.get(
        "/orders", headers=auth(tenant), params={"cursor": cursor, "status": used_with}
    )
    assert_error(response, 400, "validation_error")
    assert len((await page(client, tenant, None, cursor, limit=10))["items"]) == 5


async def test_a_filtered_cursor_of_another_tenant_is_refused(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    cursor = await cursor_of(client, db, tenant, "closed")
    other = f"{tenant}-o"
    await insert(db, other, [(BASE, "closed"), (BASE + timedelta(seconds=1), "closed")])
    response = await client.get(
        "/orders", headers=auth(other), params={"cursor": cursor, "status": "closed"}
    )
    assert_error(response, 400, "validation_error")


# --- stable under concurrent inserts and status changes --------------------------------------


async def confirm_directly(client: httpx.AsyncClient, tenant: str, order_id: str) -> None:
    response = await client.patch(
        f"/orders/{order_id}/confirm",
        headers=auth(tenant, If_Match="*"),
        json={"totalCents": 1},
    )
    assert response.status_code == 200, response.text


async def test_paging_drafts_while_drafts_are_made_and_confirmed(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    """The guarantee: every draft committed before the first page is listed exactly once if it
    is still a draft when the page that covers its position is read, and not at all if it was
    confirmed before; a status change never shifts the rows behind it (no skip, no duplicate);
    drafts created meanwhile are newer than the first page, so never listed on it."""
    pattern = ["draft", "draft", "confirmed", "draft", "closed", "draft", "draft"] * 3
    past = datetime.now(UTC) - timedelta(hours=1)  # before anything the API creates now
    made = await insert(
        db, tenant, [(past + timedelta(seconds=i), s) for i, s in enumerate(pattern)]
    )
    drafts = newest_first([r for r in made if r["status"] == "draft"])  # 15, newest first
    assert len(drafts) == 15

    seen: list[dict[str, Any]] = []
    confirmed_unseen: set[str] = set()
    created: list[str] = []
    cursor = None
    for turn in range(20):
        body = await page(client, tenant, "draft", cursor, limit=2)
        seen.extend(body["items"])
        cursor = body["nextCursor"]
        if cursor is None:
            break
        seen_ids = [item["id"] for item in seen]
        # between pages: a new draft, an already-seen draft confirmed, and — every other
        # turn — the very next unseen draft and the oldest unseen draft confirmed
        created.append((await create_order(client, tenant))["id"])
        await confirm_directly(client, tenant, seen_ids[-1])
        unseen = [i for i in drafts if i not in seen_ids and i not in confirmed_unseen]
        if turn % 2 == 0 and len(unseen) >= 2:
            for victim in (unseen[0], unseen[-1]):
                await confirm_directly(client, tenant, victim)
                confirmed_unseen.add(victim)
    else:
        raise AssertionError("pagination did not end")

    ids = [item["id"] for item in seen]
    assert len(ids) == len(set(ids)), "no duplicate"
    assert_strictly_newest_first(seen)
    assert all(item["status"] == "draft" for item in seen)
    assert confirmed_unseen, "the test confirmed drafts ahead of the cursor"
    assert ids == [i for i in drafts if i not in confirmed_unseen]
    assert not set(created) & set(ids)


async def test_paging_drafts_with_changes_racing_the_reads(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    """Same, with the inserts and confirms running at the same time as each page's read: a
    draft nobody touches is listed exactly once, in order, whatever else happens."""
    past = datetime.now(UTC) - timedelta(hours=1)
    made = await insert(
        db,
        tenant,
        [(past + timedelta(milliseconds=i), "draft" if i % 4 else "closed") for i in range(80)],
    )
    drafts = newest_first([r for r in made if r["status"] == "draft"])
    touched = set(drafts[1::3])
    untouched = [i for i in drafts if i not in touched]
    queue = [i for i in drafts if i in touched]

    async def churn() -> None:
        await create_order(client, tenant)
        if queue:
            await confirm_directly(client, tenant, queue.pop())

    seen: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        body, *_ = await asyncio.gather(
            page(client, tenant, "draft", cursor, limit=3), churn(), churn()
        )
        seen.extend(body["items"])
        cursor = body["nextCursor"]
        if cursor is None:
            break
    else:
        raise AssertionError("pagination did not end")

    ids = [item["id"] for item in seen]
    assert len(ids) == len(set(ids))
    assert_strictly_newest_first(seen)
    assert [i for i in ids if i in set(untouched)] == untouched
    assert set(ids) <= set(drafts)


# --- on the index ----------------------------------------------------------------------------


def plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    nodes = [plan]
    for child in plan.get("Plans", []):
        nodes.extend(plan_nodes(child))
    return nodes


def assert_on_status_index(plan: dict[str, Any], after_cursor: bool) -> dict[str, Any]:
    """The plan reads the status index in order: no sort, no other scan; the cursor's row
    comparison, when there is one, bounds the index scan (so a deep page starts where it
    should), rather than filtering rows read from the top."""
    nodes = plan_nodes(plan)
    types = [node["Node Type"] for node in nodes]
    assert "Sort" not in types, types
    assert "Incremental Sort" not in types, types
    scans = [node for node in nodes if "Scan" in node["Node Type"]]
    assert len(scans) == 1, types
    [scan] = scans
    assert scan["Node Type"] in {"Index Scan", "Index Only Scan"}, types
    assert scan["Index Name"] == STATUS_INDEX
    condition = scan["Index Cond"]
    assert "status" in condition, condition
    assert "tenant_id" in condition, condition
    if after_cursor:
        assert "created_at" in condition, condition
    assert "Filter" not in scan, scan.get("Filter")
    return scan


@pytest.fixture
async def many_orders(db: asyncpg.Pool) -> Any:
    """30,000 orders of one tenant, a third per status, and fresh statistics."""
    tenant = f"explain-{uuid.uuid4().hex[:12]}"
    await db.execute(
        """INSERT INTO orders (id, tenant_id, status, version, total_cents, created_at,
                               updated_at)
        SELECT gen_random_uuid(), $1, (ARRAY['draft', 'confirmed', 'closed'])[n % 3 + 1],
               1, NULL, $2::timestamptz + n * interval '1 millisecond',
               $2::timestamptz + n * interval '1 millisecond'
        FROM generate_series(1, 30000) AS n""",
        tenant,
        BASE,
    )
    await db.execute("ANALYZE orders")
    yield tenant
    await db.execute("DELETE FROM orders WHERE tenant_id = $1", tenant)


async def explain(
    conn: asyncpg.Connection, sql: str, *args: object, analyze: bool = False
) -> dict[str, Any]:
    options = "ANALYZE, BUFFERS, FORMAT JSON" if analyze else "FORMAT JSON"
    raw = await conn.fetchval(f"EXPLAIN ({options}) {sql}", *args)
    plan: dict[str, Any] = json.loads(raw)[0]["Plan"]
    return plan


async def explain_execute(conn: asyncpg.Connection, call: str) -> dict[str, Any]:
    raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {call}")
    plan: dict[str, Any] = json.loads(raw)[0]["Plan"]
    return plan


async def deep_cursor(db: asyncpg.Pool, tenant: str, status: str) -> tuple[datetime, uuid.UUID]:
    row = await db.fetchrow(
        "SELECT created_at, id FROM orders WHERE tenant_id = $1 AND status = $2"
        " ORDER BY created_at DESC, id DESC OFFSET 9000 LIMIT 1",
        tenant,
        status,
    )
    assert row is not None
    return row["created_at"], row["id"]


@pytest.mark.parametrize("status", STATUSES)
async def test_filtered_pages_use_the_status_index(
    db: asyncpg.Pool, many_orders: str, status: str
) -> None:
    at, last_id = await deep_cursor(db, many_orders, status)
    async with db.acquire() as conn:
        first = await explain(conn, LIST_FIRST_PAGE_BY_STATUS, many_orders, 11, status)
        assert_on_status_index(first, after_cursor=False)
        deep = await explain(
            conn, LIST_AFTER_CURSOR_BY_STATUS, many_orders, 11, at, last_id, status
        )
        assert_on_status_index(deep, after_cursor=True)


async def test_generic_plans_use_the_status_index(db: asyncpg.Pool, many_orders: str) -> None:
    """What a prepared statement runs with after a few executions (the pool prepares them)."""
    at, last_id = await deep_cursor(db, many_orders, "confirmed")
    async with db.acquire() as conn:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        try:
            await conn.execute(f"PREPARE first_page AS {LIST_FIRST_PAGE_BY_STATUS}")
            await conn.execute(f"PREPARE deep_page AS {LIST_AFTER_CURSOR_BY_STATUS}")
            # EXPLAIN EXECUTE takes no bind parameters: the values go in as literals
            first = await explain_execute(conn, f"first_page('{many_orders}', 11, 'confirmed')")
            scan = assert_on_status_index(first, after_cursor=False)
            assert "$1" in scan["Index Cond"], "a generic plan keeps the parameters"
            deep = await explain_execute(
                conn,
                f"deep_page('{many_orders}', 11, '{at.isoformat()}', '{last_id}', 'confirmed')",
            )
            assert_on_status_index(deep, after_cursor=True)
        finally:
            # not ALL: asyncpg keeps its own prepared statements on this connection
            for name in await conn.fetch(
                "SELECT name FROM pg_prepared_statements WHERE name = ANY($1::text[])",
                ["first_page", "deep_page"],
            ):
                await conn.execute(f"DEALLOCATE {name[0]}")
            await conn.execute("RESET plan_cache_mode")


async def test_a_deep_filtered_page_reads_no_more_than_the_first(
    db: asyncpg.Pool, many_orders: str
) -> None:
    at, last_id = await deep_cursor(db, many_orders, "draft")
    async with db.acquire() as conn:
        first = await explain(
            conn, LIST_FIRST_PAGE_BY_STATUS, many_orders, 11, "draft", analyze=True
        )
        deep = await explain(
            conn,
            LIST_AFTER_CURSOR_BY_STATUS,
            many_orders,
            11,
            at,
            last_id,
            "draft",
            analyze=True,
        )
    for plan in (first, deep):
        scan = assert_on_status_index(plan, after_cursor=plan is deep)
        assert scan["Actual Rows"] == 11  # limit + 1 rows read, not the 9,000 before them
        assert scan.get("Rows Removed by Filter", 0) == 0
    deep_blocks = deep["Shared Hit Blocks"] + deep["Shared Read Blocks"]
    first_blocks = first["Shared Hit Blocks"] + first["Shared Read Blocks"]
    assert deep_blocks <= first_blocks + 5, (first_blocks, deep_blocks)


async def test_status_given_twice_is_a_400(client: httpx.AsyncClient, tenant: str) -> None:
    response = await client.get("/orders?status=draft&status=closed", headers=auth(tenant))
    body = assert_error(response, 400, "validation_error")
    assert body["details"]["errors"][0]["loc"] == ["query", "status"]
