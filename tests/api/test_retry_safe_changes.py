"""Idempotency-Key on confirm and close: replay, reuse conflicts, failures store nothing."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from orders_api.config import Settings
from orders_api.idempotency import purge_expired_keys
from orders_api.pool import Pool
from tests.api.support import (
    assert_error,
    confirm_order,
    confirmed_order,
    create_order,
    order_row,
    outbox_rows,
)
from tests.helpers import FakeClock, auth, make_settings

WINDOW = 3600  # Settings' default, which the test app runs with


async def change(
    client: httpx.AsyncClient,
    operation: str,
    tenant: str,
    order_id: str,
    key: str | None,
    *,
    if_match: str | None,
    content: bytes | None = None,
    body: Any = None,
    **headers: str,
) -> httpx.Response:
    """PATCH …/confirm or POST …/close with the key, If-Match and body given."""
    if key is not None:
        headers["Idempotency_Key"] = key
    if if_match is not None:
        headers["If_Match"] = if_match
    if content is not None:
        headers["Content_Type"] = "application/json"
    send = client.patch if operation == "confirm" else client.post
    return await send(
        f"/orders/{order_id}/{operation}",
        headers=auth(tenant, **headers),
        content=content,
        json=body if content is None else None,
    )


async def confirm(
    client: httpx.AsyncClient,
    tenant: str,
    order_id: str,
    key: str | None,
    body: Any = None,
    *,
    if_match: str | None = '"1"',
    content: bytes | None = None,
    **headers: str,
) -> httpx.Response:
    body = {"totalCents": 5} if body is None and content is None else body
    return await change(
        client, "confirm", tenant, order_id, key, if_match=if_match, content=content, body=body,
        **headers,
    )  # fmt: skip


async def close(
    client: httpx.AsyncClient,
    tenant: str,
    order_id: str,
    key: str | None,
    *,
    if_match: str | None = None,
    content: bytes | None = None,
    **headers: str,
) -> httpx.Response:
    return await change(
        client, "close", tenant, order_id, key, if_match=if_match, content=content, **headers
    )


async def key_row(db: asyncpg.Pool, tenant: str, key: str) -> asyncpg.Record | None:
    row: asyncpg.Record | None = await db.fetchrow(
        "SELECT status_code, response_json::text AS response, request_hash, created_at"
        " FROM idempotency_keys WHERE tenant_id = $1 AND key = $2",
        tenant,
        key,
    )
    return row


async def change_keys(db: asyncpg.Pool, tenant: str) -> int:
    """Keys the tenant stored with confirm or close (create stores 201)."""
    return int(
        await db.fetchval(
            "SELECT count(*) FROM idempotency_keys WHERE tenant_id = $1 AND status_code = 200",
            tenant,
        )
    )


def assert_fresh(response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert "idempotent-replayed" not in response.headers


def assert_replay_of(replay: httpx.Response, original: httpx.Response) -> None:
    assert replay.status_code == 200, replay.text
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.content == original.content
    assert replay.headers["etag"] == original.headers["etag"]
    assert replay.headers["content-type"] == "application/json"


def assert_reused(response: httpx.Response) -> None:
    body = assert_error(response, 409, "conflict")
    assert body["details"]["reason"] == "idempotency_key_reused"
    assert "idempotent-replayed" not in response.headers


def new_key() -> str:
    return f"k-{uuid.uuid4()}"


# --- replay -----------------------------------------------------------------------------------


async def test_keyed_confirm_answers_and_stores_its_response(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    response = await confirm(client, tenant, order["id"], key, {"totalCents": 5})
    assert_fresh(response)
    assert response.headers["etag"] == '"2"'
    assert response.json() == {
        "id": order["id"],
        "status": "confirmed",
        "version": 2,
        "totalCents": 5,
    }
    row = await key_row(db, tenant, key)
    assert row is not None
    assert row["status_code"] == 200
    assert json.loads(row["response"]) == response.json()
    stored = await order_row(db, order["id"])
    assert (stored["status"], stored["version"], stored["total_cents"]) == ("confirmed", 2, 5)


@pytest.mark.parametrize(
    "retry",
    [
        b'{"totalCents": 5}',
        b'{"totalCents":5.0}',
        b'{ "totalCents" :\n 5e0 }',
        b'{"totalCents": 0.5e1}',
    ],
)
async def test_confirm_retry_with_the_same_request_replays(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, retry: bytes
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    first = await confirm(client, tenant, order["id"], key, content=b'{"totalCents":5}')
    assert_fresh(first)
    replay = await confirm(client, tenant, order["id"], key, content=retry)
    assert_replay_of(replay, first)
    stored = await order_row(db, order["id"])
    assert (stored["version"], stored["total_cents"]) == (2, 5)
    assert await change_keys(db, tenant) == 1


@pytest.mark.parametrize("retry_if_match", ['"1"', "1", 'W/"1"', ' "1" '])
async def test_confirm_retry_with_an_equivalent_if_match_replays(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, retry_if_match: str
) -> None:
    """The fingerprint holds the versions If-Match accepts, not its spelling."""
    order = await create_order(client, tenant)
    key = new_key()
    first = await confirm(client, tenant, order["id"], key, if_match='"1"')
    assert_fresh(first)
    replay = await confirm(client, tenant, order["id"], key, if_match=retry_if_match)
    assert_replay_of(replay, first)
    assert (await order_row(db, order["id"]))["version"] == 2


async def test_confirm_with_an_if_match_list_replays_the_same_list(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    first = await confirm(client, tenant, order["id"], key, if_match='"7", "1"')
    assert_fresh(first)
    assert_replay_of(await confirm(client, tenant, order["id"], key, if_match='"1", "7"'), first)
    assert_reused(await confirm(client, tenant, order["id"], key, if_match='"1"'))


async def test_confirm_replays_after_the_order_was_closed(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    first = await confirm(client, tenant, order["id"], key, {"totalCents": 77})
    assert_fresh(first)
    closed = await close(client, tenant, order["id"], None)
    assert closed.status_code == 200
    assert closed.headers["etag"] == '"3"'

    replay = await confirm(client, tenant, order["id"], key, {"totalCents": 77})
    assert_replay_of(replay, first)
    assert replay.headers["etag"] == '"2"'
    assert replay.json()["version"] == 2
    assert replay.json()["status"] == "confirmed"
    stored = await order_row(db, order["id"])
    assert (stored["status"], stored["version"]) == ("closed", 3)


async def test_keyed_close_replays_with_one_outbox_row(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await confirmed_order(client, tenant)
    key = new_key()
    first = await close(client, tenant, order["id"], key)
    assert_fresh(first)
    assert first.headers["etag"] == '"3"'
    assert first.json() == {"id": order["id"], "status": "closed", "version": 3}
    # no body, `{}` and whitespace are the same close
    for content in (None, b"{}", b" { } ", None):
        assert_replay_of(await close(client, tenant, order["id"], key, content=content), first)

    rows = await outbox_rows(db, order["id"])
    assert len(rows) == 1
    assert rows[0]["event_type"] == "orders.closed"
    stored = await order_row(db, order["id"])
    assert (stored["status"], stored["version"]) == ("closed", 3)
    row = await key_row(db, tenant, key)
    assert row is not None
    assert row["status_code"] == 200
    assert json.loads(row["response"]) == first.json()


async def test_keyed_close_with_if_match_replays_with_it(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await confirmed_order(client, tenant)
    key = new_key()
    first = await close(client, tenant, order["id"], key, if_match='"2"')
    assert_fresh(first)
    assert_replay_of(await close(client, tenant, order["id"], key, if_match='W/"2"'), first)
    assert_reused(await close(client, tenant, order["id"], key))  # If-Match absent: any version
    assert_reused(await close(client, tenant, order["id"], key, if_match='"3"'))
    assert_reused(await close(client, tenant, order["id"], key, if_match="*"))
    assert len(await outbox_rows(db, order["id"])) == 1


# --- the key bound to its first request ------------------------------------------------------


@pytest.mark.parametrize(
    "retry",
    [
        {"body": {"totalCents": 6}},
        {"if_match": '"1", "2"'},
        {"if_match": "*"},
    ],
    ids=["other-body", "other-if-match-list", "if-match-star"],
)
async def test_confirm_key_with_another_request_is_reused(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, retry: dict[str, Any]
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    assert_fresh(await confirm(client, tenant, order["id"], key, {"totalCents": 5}))
    assert_reused(await confirm(client, tenant, order["id"], key, **retry))
    stored = await order_row(db, order["id"])
    assert (stored["version"], stored["total_cents"]) == (2, 5)
    row = await key_row(db, tenant, key)
    assert row is not None
    assert json.loads(row["response"])["totalCents"] == 5


async def test_confirm_key_on_another_order_is_reused_and_changes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    first_order = await create_order(client, tenant)
    other = await create_order(client, tenant)
    key = new_key()
    assert_fresh(await confirm(client, tenant, first_order["id"], key))
    # the other order is a draft at version 1: the change itself would succeed
    assert_reused(await confirm(client, tenant, other["id"], key))
    stored = await order_row(db, other["id"])
    assert (stored["status"], stored["version"], stored["total_cents"]) == ("draft", 1, None)


async def test_close_key_on_another_order_is_reused_and_writes_no_event(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    first_order = await confirmed_order(client, tenant)
    other = await confirmed_order(client, tenant)
    key = new_key()
    assert_fresh(await close(client, tenant, first_order["id"], key))
    assert_reused(await close(client, tenant, other["id"], key))
    stored = await order_row(db, other["id"])
    assert (stored["status"], stored["version"]) == ("confirmed", 2)
    assert await outbox_rows(db, other["id"]) == []
    assert len(await outbox_rows(db, first_order["id"])) == 1


async def test_confirm_key_reused_on_close_is_refused(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    assert_fresh(await confirm(client, tenant, order["id"], key))
    # same order, now confirmed: a close would succeed without the key
    assert_reused(await close(client, tenant, order["id"], key))
    stored = await order_row(db, order["id"])
    assert (stored["status"], stored["version"]) == ("confirmed", 2)
    assert await outbox_rows(db, order["id"]) == []
    # and the confirm it belongs to still replays
    replay = await confirm(client, tenant, order["id"], key)
    assert replay.headers["idempotent-replayed"] == "true"


async def test_close_key_reused_on_confirm_is_refused(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    closed_one = await confirmed_order(client, tenant)
    draft = await create_order(client, tenant)
    key = new_key()
    assert_fresh(await close(client, tenant, closed_one["id"], key))
    assert_reused(await confirm(client, tenant, draft["id"], key))
    assert (await order_row(db, draft["id"]))["version"] == 1


async def test_create_key_reused_on_confirm_and_close_is_refused(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    key = new_key()
    created = await client.post("/orders", headers=auth(tenant, Idempotency_Key=key))
    assert created.status_code == 201
    order_id = created.json()["id"]
    assert_reused(await confirm(client, tenant, order_id, key))
    stored = await order_row(db, order_id)
    assert (stored["status"], stored["version"]) == ("draft", 1)

    await confirm_order(client, tenant, order_id)
    assert_reused(await close(client, tenant, order_id, key))
    stored = await order_row(db, order_id)
    assert (stored["status"], stored["version"]) == ("confirmed", 2)
    assert await outbox_rows(db, order_id) == []
    # the create still replays
    replay = await client.post("/orders", headers=auth(tenant, Idempotency_Key=key))
    assert replay.status_code == 200
    assert replay.content == created.content
    row = await key_row(db, tenant, key)
    assert row is not None
    assert row["status_code"] == 201


@pytest.mark.parametrize("operation", ["confirm", "close"])
async def test_change_key_reused_for_create_is_refused(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, operation: str
) -> None:
    key = new_key()
    if operation == "close":
        order = await confirmed_order(client, tenant)
    else:
        order = await create_order(client, tenant)
    if operation == "close":
        assert_fresh(await close(client, tenant, order["id"], key))
    else:
        assert_fresh(await confirm(client, tenant, order["id"], key))
    before = await db.fetchval("SELECT count(*) FROM orders WHERE tenant_id = $1", tenant)

    for body in (None, b"{}", b'{"unknown": 1}'):
        response = await client.post(
            "/orders",
            headers=auth(tenant, Idempotency_Key=key, Content_Type="application/json"),
            content=body,
        )
        assert_reused(response)
    assert await db.fetchval("SELECT count(*) FROM orders WHERE tenant_id = $1", tenant) == before
    row = await key_row(db, tenant, key)
    assert row is not None
    assert row["status_code"] == 200


async def test_a_bad_body_with_a_used_key_is_a_400(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    """Confirm checks its body before the key (contract: 400 before 404/409)."""
    order = await create_order(client, tenant)
    key = new_key()
    assert_fresh(await confirm(client, tenant, order["id"], key))
    assert_error(
        await confirm(client, tenant, order["id"], key, {"totalCents": 5.5}),
        400,
        "validation_error",
    )
    assert_error(
        await close(client, tenant, order["id"], key, content=b'{"x": 1}'), 400, "validation_error"
    )
    assert (await order_row(db, order["id"]))["version"] == 2


# --- failed requests store nothing -----------------------------------------------------------


async def test_confirm_of_an_unknown_order_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    key = new_key()
    assert_error(await confirm(client, tenant, str(uuid.uuid4()), key), 404, "not_found")
    assert await key_row(db, tenant, key) is None
    order = await create_order(client, tenant)
    assert_fresh(await confirm(client, tenant, order["id"], key))
    assert await key_row(db, tenant, key) is not None


async def test_close_of_another_tenants_order_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    foreign = await confirmed_order(client, f"{tenant}-other")
    key = new_key()
    assert_error(await close(client, tenant, foreign["id"], key), 404, "not_found")
    assert await key_row(db, tenant, key) is None
    assert (await order_row(db, foreign["id"]))["status"] == "confirmed"
    own = await confirmed_order(client, tenant)
    assert_fresh(await close(client, tenant, own["id"], key))


async def test_stale_confirm_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    body = assert_error(
        await confirm(client, tenant, order["id"], key, if_match='"5"'), 409, "conflict"
    )
    assert body["details"] == {"reason": "stale_version", "currentVersion": 1}
    assert await key_row(db, tenant, key) is None
    assert_fresh(await confirm(client, tenant, order["id"], key, if_match='"1"'))


async def test_stale_close_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await confirmed_order(client, tenant)
    key = new_key()
    body = assert_error(
        await close(client, tenant, order["id"], key, if_match='"1"'), 409, "conflict"
    )
    assert body["details"] == {"reason": "stale_version", "currentVersion": 2}
    assert await key_row(db, tenant, key) is None
    assert await outbox_rows(db, order["id"]) == []
    assert_fresh(await close(client, tenant, order["id"], key, if_match='"2"'))


async def test_invalid_transition_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    body = assert_error(await close(client, tenant, order["id"], key), 409, "conflict")
    assert body["details"] == {"reason": "invalid_transition", "currentStatus": "draft"}
    assert await key_row(db, tenant, key) is None

    confirm_key = new_key()
    assert_fresh(await confirm(client, tenant, order["id"], confirm_key))
    body = assert_error(
        await confirm(client, tenant, order["id"], new_key(), if_match="*"), 409, "conflict"
    )
    assert body["details"] == {"reason": "invalid_transition", "currentStatus": "confirmed"}

    # the key refused on the draft now closes the confirmed order
    closed = await close(client, tenant, order["id"], key)
    assert_fresh(closed)
    assert closed.json()["version"] == 3
    assert await change_keys(db, tenant) == 2


@pytest.mark.parametrize(
    "bad",
    [
        {"body": {"totalCents": 1.5}},
        {"body": {"totalCents": "5"}},
        {"body": {"totalCents": 5, "extra": 1}},
        {"content": b'{"totalCents": '},
        {"if_match": "nope"},
        {"if_match": None},  # 428
    ],
    ids=["fraction", "string", "unknown-field", "malformed-json", "malformed-if-match", "428"],
)
async def test_refused_confirm_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, bad: dict[str, Any]
) -> None:
    order = await create_order(client, tenant)
    key = new_key()
    response = await confirm(client, tenant, order["id"], key, **bad)
    if bad.get("if_match", '"1"') is None:
        assert_error(response, 428, "precondition_required")
    else:
        assert_error(response, 400, "validation_error")
    assert await key_row(db, tenant, key) is None
    assert (await order_row(db, order["id"]))["version"] == 1
    assert_fresh(await confirm(client, tenant, order["id"], key, {"totalCents": 9}))
    assert (await order_row(db, order["id"]))["total_cents"] == 9


async def test_refused_close_body_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await confirmed_order(client, tenant)
    key = new_key()
    assert_error(
        await close(client, tenant, order["id"], key, content=b'{"a": 1}'), 400, "validation_error"
    )
    assert_error(
        await close(client, tenant, order["id"], key, content=b"[}"), 400, "validation_error"
    )
    assert await key_row(db, tenant, key) is None
    assert await outbox_rows(db, order["id"]) == []
    assert_fresh(await close(client, tenant, order["id"], key))


@pytest.mark.parametrize("key", ["", "a" * 256, "has space", "caf\u00e9"])
async def test_malformed_key_on_a_change_is_a_400(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, key: str
) -> None:
    order = await confirmed_order(client, tenant)
    headers = auth(tenant)
    raw = [(k.encode(), v.encode()) for k, v in headers.items()]
    raw.append((b"idempotency-key", key.encode()))
    response = await client.post(f"/orders/{order['id']}/close", headers=raw)
    assert_error(response, 400, "validation_error")
    assert (await order_row(db, order["id"]))["status"] == "confirmed"
    assert await outbox_rows(db, order["id"]) == []


# --- without a key ---------------------------------------------------------------------------


async def test_without_a_key_a_second_close_is_an_invalid_transition(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await confirmed_order(client, tenant)
    first = await close(client, tenant, order["id"], None)
    assert_fresh(first)
    second = await close(client, tenant, order["id"], None)
    body = assert_error(second, 409, "conflict")
    assert body["details"] == {"reason": "invalid_transition", "currentStatus": "closed"}
    assert "idempotent-replayed" not in second.headers
    assert len(await outbox_rows(db, order["id"])) == 1
    assert await change_keys(db, tenant) == 0


async def test_without_a_key_a_second_confirm_is_a_conflict(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await create_order(client, tenant)
    assert_fresh(await confirm(client, tenant, order["id"], None))
    body = assert_error(await confirm(client, tenant, order["id"], None), 409, "conflict")
    assert body["details"] == {"reason": "stale_version", "currentVersion": 2}
    body = assert_error(
        await confirm(client, tenant, order["id"], None, if_match="*"), 409, "conflict"
    )
    assert body["details"] == {"reason": "invalid_transition", "currentStatus": "confirmed"}
    assert await change_keys(db, tenant) == 0


# --- window, tenants, metrics ----------------------------------------------------------------


def test_the_default_window_is_an_hour() -> None:
    assert Settings.model_fields["idempotency_window_seconds"].default == WINDOW


async def test_a_close_key_is_free_again_after_the_window(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, clock: FakeClock
) -> None:
    first_order = await confirmed_order(client, tenant)
    other = await confirmed_order(client, tenant)
    key = new_key()
    first = await close(client, tenant, first_order["id"], key)
    assert_fresh(first)

    clock.advance(WINDOW - 60)
    assert_replay_of(await close(client, tenant, first_order["id"], key), first)
    assert_reused(await close(client, tenant, other["id"], key))

    clock.advance(61)  # past the window
    taken = await close(client, tenant, other["id"], key)
    assert_fresh(taken)
    assert taken.json()["id"] == other["id"]
    row = await key_row(db, tenant, key)
    assert row is not None
    assert json.loads(row["response"])["id"] == other["id"]
    assert len(await outbox_rows(db, other["id"])) == 1
    # and the new use replays from now on
    assert_replay_of(await close(client, tenant, other["id"], key), taken)


async def test_a_retry_after_the_window_is_a_new_request(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, clock: FakeClock
) -> None:
    order = await confirmed_order(client, tenant)
    key = new_key()
    assert_fresh(await close(client, tenant, order["id"], key))
    clock.advance(WINDOW + 1)
    body = assert_error(await close(client, tenant, order["id"], key), 409, "conflict")
    assert body["details"] == {"reason": "invalid_transition", "currentStatus": "closed"}
    assert await key_row(db, tenant, key) is None  # the expired key is gone, nothing new stored
    assert len(await outbox_rows(db, order["id"])) == 1


async def test_a_confirm_key_is_free_again_after_the_window(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, clock: FakeClock
) -> None:
    first_order = await create_order(client, tenant)
    other = await create_order(client, tenant)
    key = new_key()
    assert_fresh(await confirm(client, tenant, first_order["id"], key))
    assert_reused(await confirm(client, tenant, other["id"], key))
    clock.advance(WINDOW + 1)
    assert_fresh(await confirm(client, tenant, other["id"], key, {"totalCents": 42}))
    stored = await order_row(db, other["id"])
    assert (stored["status"], stored["total_cents"]) == ("confirmed", 42)


async def test_a_create_key_past_the_window_serves_a_close(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, clock: FakeClock
) -> None:
    key = new_key()
    created = await client.post("/orders", headers=auth(tenant, Idempotency_Key=key))
    assert created.status_code == 201
    order = await confirmed_order(client, tenant)
    assert_reused(await close(client, tenant, order["id"], key))
    clock.advance(WINDOW + 1)
    assert_fresh(await close(client, tenant, order["id"], key))
    row = await key_row(db, tenant, key)
    assert row is not None
    assert row["status_code"] == 200


async def test_keys_are_per_tenant(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    other_tenant = f"{tenant}-b"
    mine = await confirmed_order(client, tenant)
    theirs = await confirmed_order(client, other_tenant)
    key = new_key()
    mine_closed = await close(client, tenant, mine["id"], key)
    assert_fresh(mine_closed)
    theirs_closed = await close(client, other_tenant, theirs["id"], key)
    assert_fresh(theirs_closed)
    assert theirs_closed.json()["id"] == theirs["id"]
    # each tenant's retry replays its own answer
    assert_replay_of(await close(client, tenant, mine["id"], key), mine_closed)
    assert_replay_of(await close(client, other_tenant, theirs["id"], key), theirs_closed)
    # the other tenant's order stays invisible: with a fresh key it is a 404, with this
    # tenant's used key the same 409 as an order that does not exist at all
    assert_error(await close(client, tenant, theirs["id"], new_key()), 404, "not_found")
    foreign = await close(client, tenant, theirs["id"], key)
    unknown = await close(client, tenant, str(uuid.uuid4()), key)
    assert_reused(foreign)
    assert foreign.content == unknown.content
    assert len(await outbox_rows(db, mine["id"])) == 1
    assert len(await outbox_rows(db, theirs["id"])) == 1
    assert await key_row(db, tenant, key) is not None
    assert await key_row(db, other_tenant, key) is not None


async def metric(client: httpx.AsyncClient, operation: str, outcome: str) -> float:
    response = await client.get("/metrics")
    assert response.status_code == 200
    pattern = (
        rf'^orders_api_idempotency_total\{{operation="{operation}",outcome="{outcome}"\}} (\S+)$'
    )
    found = re.search(pattern, response.text, re.MULTILINE)
    return 0.0 if found is None else float(found.group(1))


async def test_metrics_count_keyed_changes(client: httpx.AsyncClient, tenant: str) -> None:
    order = await confirmed_order(client, tenant)
    other = await confirmed_order(client, tenant)
    key = new_key()
    before = {
        outcome: await metric(client, "close", outcome)
        for outcome in ("created", "replayed", "conflict")
    }
    confirm_before = await metric(client, "confirm", "replayed")

    assert_fresh(await close(client, tenant, order["id"], key))
    await close(client, tenant, order["id"], key)
    await close(client, tenant, order["id"], key)
    assert_reused(await close(client, tenant, other["id"], key))
    await close(client, tenant, other["id"], None)  # no key: not counted

    assert await metric(client, "close", "created") == before["created"] + 1
    assert await metric(client, "close", "replayed") == before["replayed"] + 2
    assert await metric(client, "close", "conflict") == before["conflict"] + 1
    assert await metric(client, "confirm", "replayed") == confirm_before


async def test_purge_removes_expired_change_keys(
    client: httpx.AsyncClient, db: asyncpg.Pool, database_url: str, clock: FakeClock, tenant: str
) -> None:
    old_order = await confirmed_order(client, tenant)
    new_order = await confirmed_order(client, tenant)
    old_key, new_key_ = new_key(), new_key()
    clock.advance(-2 * WINDOW)
    assert_fresh(await close(client, tenant, old_order["id"], old_key))
    clock.advance(2 * WINDOW)
    assert_fresh(await close(client, tenant, new_order["id"], new_key_))

    pool = Pool.from_settings("purge-test", make_settings(database_url), max_size=1)
    try:
        removed = await purge_expired_keys(pool, timedelta(seconds=WINDOW), datetime.now(UTC))
    finally:
        await pool.close()

    assert removed >= 1
    assert await key_row(db, tenant, old_key) is None
    assert await key_row(db, tenant, new_key_) is not None
    assert (await order_row(db, old_order["id"]))["status"] == "closed"
    assert len(await outbox_rows(db, old_order["id"])) == 1
