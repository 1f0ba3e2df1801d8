"""POST /orders/{id}/close: confirmed -> closed plus exactly one outbox row, in one transaction."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from orders_api.orders.service import iso
from tests.api.support import (
    assert_error,
    confirmed_order,
    create_order,
    get_order,
    order_row,
    outbox_rows,
)
from tests.helpers import auth


async def close(
    client: httpx.AsyncClient,
    tenant: str,
    order_id: str,
    if_match: str | None = None,
    **kwargs: Any,
) -> httpx.Response:
    headers = auth(tenant) if if_match is None else auth(tenant, If_Match=if_match)
    headers.update(kwargs.pop("headers", {}))
    return await client.post(f"/orders/{order_id}/close", headers=headers, **kwargs)


async def test_close_sets_closed_and_writes_one_outbox_row(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await confirmed_order(client, tenant, total_cents=9900)
    response = await close(client, tenant, order["id"])
    assert response.status_code == 200
    assert response.json() == {"id": order["id"], "status": "closed", "version": 3}
    assert response.headers["ETag"] == '"3"'

    stored = await get_order(client, tenant, order["id"])
    assert stored["status"] == "closed"
    assert stored["version"] == 3
    assert stored["totalCents"] == 9900

    rows = await outbox_rows(db, order["id"])
    assert len(rows) == 1
    event = rows[0]
    assert event["event_type"] == "orders.closed"
    assert event["tenant_id"] == tenant
    assert str(event["order_id"]) == order["id"]
    assert event["published_at"] is None
    assert event["payload"] == {
        "orderId": order["id"],
        "tenantId": tenant,
        "totalCents": 9900,
        "closedAt": stored["updatedAt"],
    }
    row = await order_row(db, order["id"])
    assert event["payload"]["closedAt"] == iso(row["updated_at"])
    assert event["created_at"] == row["updated_at"]


async def test_closed_at_keeps_microseconds_and_a_zero_total(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await confirmed_order(client, tenant, total_cents=0)
    assert (await close(client, tenant, order["id"])).status_code == 200
    (event,) = await outbox_rows(db, order["id"])
    assert event["payload"]["totalCents"] == 0
    closed_at = event["payload"]["closedAt"]
    assert len(closed_at) == len("2026-01-01T00:00:00.000000Z")
    assert closed_at.endswith("Z")
    assert closed_at == (await get_order(client, tenant, order["id"]))["updatedAt"]


@pytest.mark.parametrize("if_match", ['"2"', "2", 'W/"2"', '"1", "2"', "*", '"0", "2"'])
async def test_close_with_a_matching_if_match(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, if_match: str
) -> None:
    order = await confirmed_order(client, tenant)
    response = await close(client, tenant, order["id"], if_match)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == 3
    assert len(await outbox_rows(db, order["id"])) == 1


@pytest.mark.parametrize(
    "if_match", ['"1"', "3", 'W/"1"', '"1", "3"', '"0"', '"abc"', 'W/"x"', '"0", "abc"']
)
async def test_stale_if_match_is_a_conflict_and_writes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, if_match: str
) -> None:
    order = await confirmed_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await close(client, tenant, order["id"], if_match)
    body = assert_error(response, 409, "conflict")
    assert body["details"] == {"reason": "stale_version", "currentVersion": 2}
    assert body["message"] == "stale version"
    assert await get_order(client, tenant, order["id"]) == before
    assert await outbox_rows(db, order["id"]) == []


@pytest.mark.parametrize("if_match", ["", "abc", '"2', "W/2", "*, *", '"2",', "x" * 1025])
async def test_malformed_if_match_is_rejected_and_writes_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, if_match: str
) -> None:
    order = await confirmed_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await close(client, tenant, order["id"], if_match)
    assert_error(response, 400, "validation_error")
    assert await get_order(client, tenant, order["id"]) == before
    assert await outbox_rows(db, order["id"]) == []


@pytest.mark.parametrize("if_match", [None, '"1"', "*"])
async def test_closing_a_draft_is_an_invalid_transition(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, if_match: str | None
) -> None:
    order = await create_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await close(client, tenant, order["id"], if_match)
    body = assert_error(response, 409, "conflict")
    assert body["details"] == {"reason": "invalid_transition", "currentStatus": "draft"}
    assert await get_order(client, tenant, order["id"]) == before
    assert await outbox_rows(db, order["id"]) == []


async def test_stale_if_match_on_a_draft_reports_stale_version(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    order = await create_order(client, tenant)
    response = await close(client, tenant, order["id"], '"2"')
    body = assert_error(response, 409, "conflict")
    assert body["details"] == {"reason": "stale_version", "currentVersion": 1}
    assert await outbox_rows(db, order["id"]) == []


@pytest.mark.parametrize(
    ("if_match", "reason"),
    [(None, "invalid_transition"), ('"3"', "invalid_transition"), ('"2"', "stale_version")],
)
async def test_closing_twice_is_a_conflict_and_keeps_one_row(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    tenant: str,
    if_match: str | None,
    reason: str,
) -> None:
    order = await confirmed_order(client, tenant)
    assert (await close(client, tenant, order["id"])).status_code == 200
    after_first = await get_order(client, tenant, order["id"])
    again = await close(client, tenant, order["id"], if_match)
    body = assert_error(again, 409, "conflict")
    assert body["details"]["reason"] == reason
    if reason == "invalid_transition":
        assert body["details"]["currentStatus"] == "closed"
    else:
        assert body["details"]["currentVersion"] == 3
    assert len(await outbox_rows(db, order["id"])) == 1
    assert await get_order(client, tenant, order["id"]) == after_first


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (None, None),
        (b"", "application/json"),
        (b"  \n", "application/json"),
        (b"{}", "application/json"),
        (b"{ }", None),
        (b"", "text/plain"),
    ],
)
async def test_close_body_may_be_empty_or_an_empty_object(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    tenant: str,
    content: bytes | None,
    content_type: str | None,
) -> None:
    order = await confirmed_order(client, tenant)
    headers = {"Content-Type": content_type} if content_type else {}
    response = await close(client, tenant, order["id"], content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert len(await outbox_rows(db, order["id"])) == 1


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b'{"reason": "done"}', "application/json", 400, "validation_error"),
        (b'{"totalCents": 5}', "application/json", 400, "validation_error"),
        (b"[]", "application/json", 400, "validation_error"),
        (b"null", "application/json", 400, "validation_error"),
        (b'"x"', "application/json", 400, "validation_error"),
        (b"{", "application/json", 400, "validation_error"),
        (b"{}", "text/plain", 415, "unsupported_media_type"),
        (b"a=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
async def test_bad_close_bodies_change_nothing(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    tenant: str,
    content: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    order = await confirmed_order(client, tenant)
    before = await get_order(client, tenant, order["id"])
    response = await close(
        client, tenant, order["id"], content=content, headers={"Content-Type": content_type}
    )
    assert_error(response, status, code)
    assert await get_order(client, tenant, order["id"]) == before
    assert await outbox_rows(db, order["id"]) == []


async def test_unknown_foreign_and_malformed_ids_are_not_found(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    foreign = await confirmed_order(client, tenant + "-other")
    for order_id in (str(uuid.uuid4()), foreign["id"], "not-a-uuid"):
        for if_match in (None, '"2"', '"7"'):
            response = await close(client, tenant, order_id, if_match)
            assert_error(response, 404, "not_found")
    assert (await get_order(client, tenant + "-other", foreign["id"]))["status"] == "confirmed"
    assert await outbox_rows(db, foreign["id"]) == []


async def test_order_of_checks(client: httpx.AsyncClient, tenant: str) -> None:
    unknown = str(uuid.uuid4())
    no_tenant = await client.post(f"/orders/{unknown}/close", content=b"{", headers={})
    assert_error(no_tenant, 401, "unauthorized")
    bad_body = await close(client, tenant, unknown, '"1"', json={"x": 1})
    assert_error(bad_body, 400, "validation_error")
    bad_if_match = await close(client, tenant, unknown, "nope")
    assert_error(bad_if_match, 400, "validation_error")
    assert_error(await close(client, tenant, unknown, '"1"'), 404, "not_found")
