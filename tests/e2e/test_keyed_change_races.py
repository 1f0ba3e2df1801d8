"""Retry-safe confirm and close under real concurrency: barrier-released storms of requests
with Idempotency-Keys on `orders-api serve --workers 2`."""

from __future__ import annotations

import asyncio
import http.client
import json
import uuid
from typing import Any

import asyncpg

from tests.e2e.race import Answer, Call
from tests.e2e.test_races import confirm, count, create, fire
from tests.live import LiveServer as Server

ROUNDS = 4
STORM = 16


def tenant_id() -> str:
    return f"keyed-{uuid.uuid4().hex[:12]}"


def replayed(answer: Answer) -> bool:
    value = answer.headers.get("idempotent-replayed")
    assert value in (None, "true"), value
    return value == "true"


def error_details(answer: Answer) -> dict[str, Any]:
    body = json.loads(answer.body)
    assert body["code"] == "conflict", body
    details: dict[str, Any] = body["details"]
    return details


async def key_rows(db: asyncpg.Pool, tenant: str, keys: list[str]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await db.fetch(
        "SELECT key, status_code, response_json::text AS response FROM idempotency_keys"
        " WHERE tenant_id = $1 AND key = ANY($2::text[])",
        tenant,
        keys,
    )
    return rows


def assert_one_answer_replayed_by_all(answers: list[Answer]) -> Answer:
    """Every answer 200 with the same body and ETag; exactly one is the original."""
    statuses = [answer.status for answer in answers]
    assert statuses == [200] * len(answers), [
        (a.status, a.body) for a in answers if a.status != 200
    ]
    assert len({answer.body for answer in answers}) == 1
    assert len({answer.headers["etag"] for answer in answers}) == 1
    originals = [answer for answer in answers if not replayed(answer)]
    assert len(originals) == 1, f"{len(originals)} answers are not replays"
    return originals[0]


async def test_one_key_closes_once(server: Server, db: asyncpg.Pool) -> None:
    for _ in range(ROUNDS):
        tenant = tenant_id()
        order = await create(server, tenant)
        await confirm(server, tenant, order["id"])
        key = f"close-{uuid.uuid4()}"
        call = Call(
            "POST", f"/orders/{order['id']}/close", {"X-Tenant-Id": tenant, "Idempotency-Key": key}
        )
        answers = await fire(server, [call] * STORM)

        original = assert_one_answer_replayed_by_all(answers)
        assert original.headers["etag"] == '"3"'
        assert json.loads(original.body) == {"id": order["id"], "status": "closed", "version": 3}
        order_id = uuid.UUID(str(order["id"]))
        assert await count(db, "outbox WHERE order_id = $1", order_id) == 1
        row = await db.fetchrow("SELECT status, version FROM orders WHERE id = $1", order_id)
        assert tuple(row) == ("closed", 3)
        [stored] = await key_rows(db, tenant, [key])
        assert stored["status_code"] == 200
        assert json.loads(stored["response"]) == json.loads(original.body)


async def test_one_key_confirms_once(server: Server, db: asyncpg.Pool) -> None:
    """The same request in different spellings (body number, If-Match form) is one request."""
    for _ in range(ROUNDS):
        tenant = tenant_id()
        order = await create(server, tenant)
        key = f"confirm-{uuid.uuid4()}"
        bodies = [b'{"totalCents": 4321}', b'{"totalCents":4321.0}']
        if_matches = ['"1"', 'W/"1"', "1"]
        calls = [
            Call(
                "PATCH",
                f"/orders/{order['id']}/confirm",
                {
                    "X-Tenant-Id": tenant,
                    "Idempotency-Key": key,
                    "If-Match": if_matches[i % 3],
                    "Content-Type": "application/json",
                },
                bodies[i % 2],
            )
            for i in range(STORM)
        ]
        answers = await fire(server, calls)

        original = assert_one_answer_replayed_by_all(answers)
        assert original.headers["etag"] == '"2"'
        assert json.loads(original.body) == {
            "id": order["id"],
            "status": "confirmed",
            "version": 2,
            "totalCents": 4321,
        }
        row = await db.fetchrow(
            "SELECT status, version, total_cents FROM orders WHERE id = $1",
            uuid.UUID(str(order["id"])),
        )
        assert tuple(row) == ("confirmed", 2, 4321)
        assert len(await key_rows(db, tenant, [key])) == 1


async def test_distinct_keys_close_once_and_the_losers_store_nothing(
    server: Server, db: asyncpg.Pool
) -> None:
    for _ in range(ROUNDS):
        tenant = tenant_id()
        order = await create(server, tenant)
        await confirm(server, tenant, order["id"])
        keys = [f"k{i}-{uuid.uuid4().hex[:8]}" for i in range(STORM)]
        calls = [
            Call(
                "POST",
                f"/orders/{order['id']}/close",
                {"X-Tenant-Id": tenant, "Idempotency-Key": key},
            )
            for key in keys
        ]
        answers = await fire(server, calls)

        assert sorted(answer.status for answer in answers) == [200] + [409] * (STORM - 1)
        assert not any(replayed(answer) for answer in answers)
        winner = next(i for i, answer in enumerate(answers) if answer.status == 200)
        for answer in answers:
            if answer.status == 409:
                assert error_details(answer) == {
                    "reason": "invalid_transition",
                    "currentStatus": "closed",
                }
        order_id = uuid.UUID(str(order["id"]))
        assert await count(db, "outbox WHERE order_id = $1", order_id) == 1
        stored = await key_rows(db, tenant, keys)
        assert [row["key"] for row in stored] == [keys[winner]]
        assert json.loads(stored[0]["response"]) == json.loads(answers[winner].body)


async def test_one_key_on_two_orders_changes_one(server: Server, db: asyncpg.Pool) -> None:
    """Half the storm closes one order, half another, all with one key: the key goes to one
    order, which closes once; the other order is untouched and every request on it is a 409."""
    for _ in range(ROUNDS):
        tenant = tenant_id()
        orders = [await create(server, tenant) for _ in range(2)]
        for order in orders:
            await confirm(server, tenant, order["id"])
        key = f"shared-{uuid.uuid4()}"
        calls = [
            Call(
                "POST",
                f"/orders/{orders[i % 2]['id']}/close",
                {"X-Tenant-Id": tenant, "Idempotency-Key": key},
            )
            for i in range(STORM)
        ]
        answers = await fire(server, calls)

        by_order = [answers[i::2] for i in range(2)]
        winners = [i for i in range(2) if any(a.status == 200 for a in by_order[i])]
        assert len(winners) == 1, [a.status for a in answers]
        won, lost = winners[0], 1 - winners[0]
        assert_one_answer_replayed_by_all(by_order[won])
        for answer in by_order[lost]:
            assert answer.status == 409, answer.body
            assert error_details(answer) == {"reason": "idempotency_key_reused"}
        won_id, lost_id = (uuid.UUID(str(orders[i]["id"])) for i in (won, lost))
        assert await count(db, "outbox WHERE order_id = $1", won_id) == 1
        assert await count(db, "outbox WHERE order_id = $1", lost_id) == 0
        row = await db.fetchrow("SELECT status, version FROM orders WHERE id = $1", lost_id)
        assert tuple(row) == ("confirmed", 2)
        [stored] = await key_rows(db, tenant, [key])
        assert json.loads(stored["response"])["id"] == str(won_id)


def head_then_get(server: Server, path: str, headers: dict[str, str]) -> list[Answer]:
    """HEAD, GET, HEAD on one keep-alive connection: a body sent after a HEAD would be read as
    the start of the next response."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    answers = []
    try:
        for method in ("HEAD", "GET", "HEAD"):
            connection.request(method, path, headers=headers)
            response = connection.getresponse()
            answers.append(
                Answer(
                    response.status,
                    {k.lower(): v for k, v in response.getheaders()},
                    response.read(),
                )
            )
    finally:
        connection.close()
    return answers


async def test_head_on_the_live_server(server: Server) -> None:
    tenant = tenant_id()
    order = await create(server, tenant)
    await confirm(server, tenant, order["id"])
    for path, headers, status in [
        (f"/orders/{order['id']}", {"X-Tenant-Id": tenant}, 200),
        ("/orders?status=confirmed", {"X-Tenant-Id": tenant}, 200),
        (f"/orders/{uuid.uuid4()}", {"X-Tenant-Id": tenant}, 404),
        ("/healthz", {}, 200),
        ("/readyz", {}, 200),
        ("/openapi.json", {}, 200),
    ]:
        head, got, head_again = await asyncio.to_thread(head_then_get, server, path, headers)
        assert got.status == status, got.body
        assert got.body
        for answer in (head, head_again):
            assert answer.status == status
            assert answer.body == b""
            assert answer.headers["content-length"] == str(len(got.body))
            assert answer.headers["content-type"] == got.headers["content-type"]
            assert answer.headers.get("etag") == got.headers.get("etag")
    [head] = await fire(
        server, [Call("HEAD", f"/orders/{order['id']}/close", {"X-Tenant-Id": tenant})]
    )
    assert head.status == 405
    assert head.headers["allow"] == "POST"
