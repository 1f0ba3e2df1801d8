"""The guarantees under real concurrency: parallel requests on a 2-worker server."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from orders_api.db import idempotency_keys, orders, outbox
from tests.e2e.conftest import Server
from tests.e2e.race import Answer, Call, fire_together

pytestmark = pytest.mark.e2e

ROUNDS = 5


async def fire(server: Server, calls: list[Call]) -> list[Answer]:
    return await asyncio.to_thread(fire_together, server.host, server.port, calls)


async def count(engine: AsyncEngine, table: object, *conditions: object) -> int:
    async with engine.connect() as conn:
        value = await conn.scalar(select(func.count()).select_from(table).where(*conditions))  # type: ignore[arg-type]
    return int(value or 0)


async def create(server: Server, tenant: str) -> dict[str, object]:
    [answer] = await fire(
        server,
        [Call("POST", "/orders", {"X-Tenant-Id": tenant, "Idempotency-Key": uuid.uuid4().hex})],
    )
    assert answer.status == 201
    body: dict[str, object] = json.loads(answer.body)
    return body


async def confirm(server: Server, tenant: str, order_id: object) -> None:
    [answer] = await fire(
        server,
        [
            Call(
                "PATCH",
                f"/orders/{order_id}/confirm",
                {"X-Tenant-Id": tenant, "If-Match": '"1"', "Content-Type": "application/json"},
                b'{"totalCents": 1234}',
            )
        ],
    )
    assert answer.status == 200


async def test_parallel_creates_with_one_key_make_one_order(
    server: Server, engine: AsyncEngine
) -> None:
    for _ in range(ROUNDS):
        tenant = f"race-{uuid.uuid4().hex[:12]}"
        headers = {
            "X-Tenant-Id": tenant,
            "Idempotency-Key": f"key-{uuid.uuid4()}",
            "Content-Type": "application/json",
        }
        answers = await fire(server, [Call("POST", "/orders", headers, b"{}")] * 24)

        statuses = sorted(answer.status for answer in answers)
        assert statuses == [200] * 23 + [201]
        assert len({answer.body for answer in answers}) == 1
        replays = [answer for answer in answers if answer.status == 200]
        assert all(answer.headers["idempotent-replayed"] == "true" for answer in replays)
        created = next(answer for answer in answers if answer.status == 201)
        assert {answer.headers["location"] for answer in answers} == {created.headers["location"]}
        assert await count(engine, orders, orders.c.tenant_id == tenant) == 1
        assert await count(engine, idempotency_keys, idempotency_keys.c.tenant_id == tenant) == 1


async def test_parallel_creates_with_distinct_keys_all_succeed(
    server: Server, engine: AsyncEngine
) -> None:
    tenant = f"race-{uuid.uuid4().hex[:12]}"
    calls = [
        Call("POST", "/orders", {"X-Tenant-Id": tenant, "Idempotency-Key": f"k{i}"})
        for i in range(24)
    ]
    answers = await fire(server, calls)
    assert [answer.status for answer in answers] == [201] * 24
    assert len({json.loads(answer.body)["id"] for answer in answers}) == 24
    assert await count(engine, orders, orders.c.tenant_id == tenant) == 24


async def test_parallel_confirms_with_one_version_succeed_once(
    server: Server, engine: AsyncEngine
) -> None:
    for _ in range(ROUNDS):
        tenant = f"race-{uuid.uuid4().hex[:12]}"
        order = await create(server, tenant)
        calls = [
            Call(
                "PATCH",
                f"/orders/{order['id']}/confirm",
                {"X-Tenant-Id": tenant, "If-Match": '"1"', "Content-Type": "application/json"},
                json.dumps({"totalCents": i}).encode(),
            )
            for i in range(16)
        ]
        answers = await fire(server, calls)

        assert sorted(answer.status for answer in answers) == [200] + [409] * 15
        winner = next(json.loads(answer.body) for answer in answers if answer.status == 200)
        assert winner["version"] == 2
        for answer in answers:
            if answer.status == 409:
                assert json.loads(answer.body)["details"] == {
                    "reason": "stale_version",
                    "currentVersion": 2,
                }
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    select(orders.c.version, orders.c.total_cents, orders.c.status).where(
                        orders.c.id == uuid.UUID(str(order["id"]))
                    )
                )
            ).one()
        assert (row.version, row.total_cents, row.status) == (
            2,
            winner["totalCents"],
            "confirmed",
        )


async def test_parallel_closes_succeed_once_with_one_outbox_row(
    server: Server, engine: AsyncEngine
) -> None:
    for _ in range(ROUNDS):
        tenant = f"race-{uuid.uuid4().hex[:12]}"
        order = await create(server, tenant)
        await confirm(server, tenant, order["id"])
        calls = [
            Call("POST", f"/orders/{order['id']}/close", {"X-Tenant-Id": tenant}) for _ in range(16)
        ]
        answers = await fire(server, calls)

        assert sorted(answer.status for answer in answers) == [200] + [409] * 15
        for answer in answers:
            if answer.status == 409:
                assert json.loads(answer.body)["details"] == {
                    "reason": "invalid_transition",
                    "currentStatus": "closed",
                }
        order_id = uuid.UUID(str(order["id"]))
        assert await count(engine, outbox, outbox.c.order_id == order_id) == 1


async def test_pages_from_different_workers_join_up(server: Server) -> None:
    tenant = f"page-{uuid.uuid4().hex[:12]}"
    calls = [
        Call("POST", "/orders", {"X-Tenant-Id": tenant, "Idempotency-Key": f"k{i}"})
        for i in range(25)
    ]
    assert {answer.status for answer in await fire(server, calls)} == {201}

    seen: list[str] = []
    cursor = None
    for _ in range(30):
        path = "/orders?limit=3" + (f"&cursor={cursor}" if cursor else "")
        # a fresh connection per page, so pages are served by whichever worker accepts it
        [answer] = await fire(server, [Call("GET", path, {"X-Tenant-Id": tenant})])
        assert answer.status == 200
        page = json.loads(answer.body)
        seen.extend(item["id"] for item in page["items"])
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 25
