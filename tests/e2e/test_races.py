"""The guarantees under real concurrency: parallel requests on a 2-worker server."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg

from tests.e2e.race import Answer, Call, fire_together
from tests.live import LiveServer as Server

ROUNDS = 5


async def fire(server: Server, calls: list[Call]) -> list[Answer]:
    return await asyncio.to_thread(fire_together, server.host, server.port, calls)


async def count(db: asyncpg.Pool, sql: str, *args: object) -> int:
    """`SELECT count(*) FROM …` as one integer."""
    return int(await db.fetchval(f"SELECT count(*) FROM {sql}", *args))


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
    server: Server, db: asyncpg.Pool
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
        assert await count(db, "orders WHERE tenant_id = $1", tenant) == 1
        assert await count(db, "idempotency_keys WHERE tenant_id = $1", tenant) == 1


async def test_parallel_creates_with_distinct_keys_all_succeed(
    server: Server, db: asyncpg.Pool
) -> None:
    tenant = f"race-{uuid.uuid4().hex[:12]}"
    calls = [
        Call("POST", "/orders", {"X-Tenant-Id": tenant, "Idempotency-Key": f"k{i}"})
        for i in range(24)
    ]
    answers = await fire(server, calls)
    assert [answer.status for answer in answers] == [201] * 24
    assert len({json.loads(answer.body)["id"] for answer in answers}) == 24
    assert await count(db, "orders WHERE tenant_id = $1", tenant) == 24


async def test_parallel_confirms_with_one_version_succeed_once(
    server: Server, db: asyncpg.Pool
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
        row = await db.fetchrow(
            "SELECT version, total_cents, status FROM orders WHERE id = $1",
            uuid.UUID(str(order["id"])),
        )
        assert tuple(row) == (
            2,
            winner["totalCents"],
            "confirmed",
        )


async def test_parallel_closes_succeed_once_with_one_outbox_row(
    server: Server, db: asyncpg.Pool
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
        assert await count(db, "outbox WHERE order_id = $1", order_id) == 1


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
