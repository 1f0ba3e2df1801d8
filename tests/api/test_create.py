"""POST /orders: idempotent create."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from tests.helpers import FakeClock, auth


async def count_orders(db: asyncpg.Pool, tenant: str) -> int:
    value = await db.fetchval("SELECT count(*) FROM orders WHERE tenant_id = $1", tenant)
    return int(value)


async def stored_key_count(db: asyncpg.Pool, tenant: str) -> int:
    value = await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE tenant_id = $1", tenant)
    return int(value)


async def test_first_request_creates_a_draft(client: httpx.AsyncClient, tenant: str) -> None:
    response = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k-1"))
    assert response.status_code == 201
    body = response.json()
    assert set(body) == {"id", "tenantId", "status", "version", "createdAt"}
    assert body["tenantId"] == tenant
    assert body["status"] == "draft"
    assert body["version"] == 1
    assert body["createdAt"].endswith("Z")
    assert len(body["createdAt"]) == len("2026-01-01T00:00:00.000000Z")
    assert response.headers["Location"] == f"/orders/{body['id']}"
    assert response.headers["ETag"] == '"1"'
    assert "Idempotent-Replayed" not in response.headers


async def test_replay_returns_the_identical_response(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    headers = auth(tenant, Idempotency_Key="k-1", Content_Type="application/json")
    first = await client.post("/orders", headers=headers, content=b"{ }")
    replay = await client.post("/orders", headers=headers, content=b"{}")
    assert first.status_code == 201
    assert replay.status_code == 200
    assert replay.content == first.content
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.headers["Location"] == first.headers["Location"]
    assert replay.headers["ETag"] == first.headers["ETag"]
    assert await count_orders(db, tenant) == 1


async def test_replay_ignores_later_changes_to_the_order(
    client: httpx.AsyncClient, tenant: str
) -> None:
    headers = auth(tenant, Idempotency_Key="k-1")
    first = await client.post("/orders", headers=headers)
    order_id = first.json()["id"]
    confirmed = await client.patch(
        f"/orders/{order_id}/confirm",
        headers=auth(tenant, If_Match='"1"'),
        json={"totalCents": 10},
    )
    assert confirmed.status_code == 200
    replay = await client.post("/orders", headers=headers)
    assert replay.status_code == 200
    assert replay.json() == first.json()


async def test_different_body_with_same_key_is_a_conflict(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    headers = auth(tenant, Idempotency_Key="k-1")
    assert (await client.post("/orders", headers=headers)).status_code == 201
    reused = await client.post("/orders", headers=headers, json={"note": "other"})
    assert reused.status_code == 409
    assert reused.json()["code"] == "conflict"
    assert reused.json()["details"] == {"reason": "idempotency_key_reused"}
    assert await count_orders(db, tenant) == 1


async def test_key_is_scoped_per_tenant(client: httpx.AsyncClient, tenant: str) -> None:
    first = await client.post("/orders", headers=auth(tenant, Idempotency_Key="shared"))
    other = await client.post("/orders", headers=auth(tenant + "x", Idempotency_Key="shared"))
    assert first.status_code == other.status_code == 201
    assert first.json()["id"] != other.json()["id"]


async def test_key_is_free_again_after_the_window(
    client: httpx.AsyncClient, db: asyncpg.Pool, clock: FakeClock, tenant: str
) -> None:
    headers = auth(tenant, Idempotency_Key="k-1")
    first = await client.post("/orders", headers=headers)
    clock.advance(3599)
    assert (await client.post("/orders", headers=headers)).status_code == 200
    clock.advance(2)
    again = await client.post("/orders", headers=headers, json={})
    assert again.status_code == 201
    assert again.json()["id"] != first.json()["id"]
    assert await count_orders(db, tenant) == 2
    assert await stored_key_count(db, tenant) == 1


async def test_failed_validation_leaves_the_key_free(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    headers = auth(tenant, Idempotency_Key="k-1")
    invalid = await client.post("/orders", headers=headers, json={"unknown": 1})
    assert invalid.status_code == 400
    assert invalid.json()["code"] == "validation_error"
    assert await stored_key_count(db, tenant) == 0
    assert (await client.post("/orders", headers=headers)).status_code == 201


async def test_reuse_check_answers_before_body_validation(
    client: httpx.AsyncClient, tenant: str
) -> None:
    headers = auth(tenant, Idempotency_Key="k-1")
    assert (await client.post("/orders", headers=headers)).status_code == 201
    invalid = await client.post("/orders", headers=headers, json={"unknown": 1})
    assert invalid.status_code == 409
    assert invalid.json()["details"]["reason"] == "idempotency_key_reused"


@pytest.mark.parametrize(
    "key",
    ["", "x" * 256, "has space", "caf\u00e9", "tab\there"],
)
async def test_invalid_keys_are_rejected(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, key: str
) -> None:
    headers = {b"X-Tenant-Id": tenant.encode(), b"Idempotency-Key": key.encode()}
    response = await client.post("/orders", headers=headers)
    assert response.status_code == 400
    assert response.json()["code"] == "validation_error"
    assert await count_orders(db, tenant) == 0


async def test_missing_key_is_rejected(client: httpx.AsyncClient, tenant: str) -> None:
    response = await client.post("/orders", headers=auth(tenant))
    assert response.status_code == 400
    assert response.json()["code"] == "validation_error"


async def test_key_is_taken_verbatim(client: httpx.AsyncClient, tenant: str) -> None:
    quoted = await client.post("/orders", headers=auth(tenant, Idempotency_Key='"k"'))
    bare = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k"))
    assert quoted.status_code == bare.status_code == 201
    assert quoted.json()["id"] != bare.json()["id"]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"{", "application/json", 400, "validation_error"),
        (b"[]", "application/json", 400, "validation_error"),
        (b'"x"', "application/json", 400, "validation_error"),
        (b"a=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ],
)
async def test_bad_bodies_store_nothing(
    client: httpx.AsyncClient,
    db: asyncpg.Pool,
    tenant: str,
    content: bytes,
    content_type: str,
    status: int,
    code: str,
) -> None:
    headers = auth(tenant, Idempotency_Key="k-1", Content_Type=content_type)
    response = await client.post("/orders", headers=headers, content=content)
    assert response.status_code == status
    assert response.json()["code"] == code
    assert await stored_key_count(db, tenant) == 0
    assert await count_orders(db, tenant) == 0


async def test_whitespace_body_counts_as_empty_object(
    client: httpx.AsyncClient, tenant: str
) -> None:
    headers = auth(tenant, Idempotency_Key="k-1", Content_Type="application/json")
    first = await client.post("/orders", headers=headers, content=b"  \n ")
    replay = await client.post("/orders", headers=headers, content=b"{}")
    assert first.status_code == 201
    assert replay.status_code == 200
