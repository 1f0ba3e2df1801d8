"""Tenancy: every order endpoint needs a valid X-Tenant-Id and sees only its tenant's orders."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx
import pytest

from tests.api.support import (
    assert_error,
    close_order,
    confirmed_order,
    create_order,
    get_order,
    outbox_rows,
)
from tests.helpers import auth

SOME_ID = "6f1c2e9a-58c4-4c2b-9f6e-2d8f3b1a7c10"
ENDPOINTS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/orders", {"headers": {"Idempotency-Key": "k-1"}}),
    ("GET", "/orders", {}),
    ("GET", f"/orders/{SOME_ID}", {}),
    (
        "PATCH",
        f"/orders/{SOME_ID}/confirm",
        {"headers": {"If-Match": '"1"'}, "json": {"totalCents": 1}},
    ),
    ("POST", f"/orders/{SOME_ID}/close", {}),
]
BAD_TENANTS = [
    "",
    " ",
    "x" * 65,
    "has space",
    "slash/tenant",
    "comma,tenant",
    "semi;colon",
    "quote'",
    "t\u00e9nant",
    "*",
]


async def send(
    client: httpx.AsyncClient, method: str, url: str, tenant: str | None, **kwargs: Any
) -> httpx.Response:
    headers: dict[bytes, bytes] = {
        name.encode(): value.encode() for name, value in kwargs.pop("headers", {}).items()
    }
    if tenant is not None:
        headers[b"X-Tenant-Id"] = tenant.encode()
    return await client.request(method, url, headers=headers, **kwargs)


@pytest.mark.parametrize(("method", "url", "kwargs"), ENDPOINTS)
async def test_missing_tenant_is_unauthorized(
    client: httpx.AsyncClient, method: str, url: str, kwargs: dict[str, Any]
) -> None:
    response = await send(client, method, url, None, **kwargs)
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize(("method", "url", "kwargs"), ENDPOINTS)
@pytest.mark.parametrize("tenant", BAD_TENANTS)
async def test_invalid_tenant_is_unauthorized(
    client: httpx.AsyncClient, method: str, url: str, kwargs: dict[str, Any], tenant: str
) -> None:
    response = await send(client, method, url, tenant, **kwargs)
    assert_error(response, 401, "unauthorized")


@pytest.mark.parametrize(("method", "url"), [(m, u) for m, u, _ in ENDPOINTS])
async def test_tenant_is_checked_before_anything_else(
    client: httpx.AsyncClient, method: str, url: str
) -> None:
    """No tenant plus every other fault at once (bad key, If-Match, JSON, limit): still 401."""
    response = await client.request(
        method,
        url.replace(SOME_ID, "not-a-uuid") + "?limit=0&cursor=x",
        headers={"If-Match": "nope", "Idempotency-Key": "", "Content-Type": "application/json"},
        content=b"{",
    )
    assert_error(response, 401, "unauthorized")


async def test_unauthorized_create_stores_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool
) -> None:
    key = f"k-{uuid.uuid4()}"
    response = await send(client, "POST", "/orders", "bad tenant", headers={"Idempotency-Key": key})
    assert_error(response, 401, "unauthorized")
    stored = await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE key = $1", key)
    assert stored == 0


@pytest.mark.parametrize("tenant", ["a", "x" * 64, "Acme.Corp_01-eu"])
async def test_valid_tenant_ids(client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str) -> None:
    tenant = tenant[:-8] + uuid.uuid4().hex[:8] if len(tenant) > 8 else tenant
    order = await create_order(client, tenant)
    assert order["tenantId"] == tenant
    stored = await db.fetchval("SELECT tenant_id FROM orders WHERE id = $1", uuid.UUID(order["id"]))
    assert stored == tenant


async def test_another_tenants_order_is_invisible_on_every_endpoint(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str
) -> None:
    owner = tenant
    draft = await create_order(client, owner)
    confirmed = await confirmed_order(client, owner)
    snapshot = {
        order_id: await get_order(client, owner, order_id)
        for order_id in (draft["id"], confirmed["id"])
    }
    for intruder in (owner + "-x", owner.upper(), owner[:-1]):
        for order_id in snapshot:
            got = await client.get(f"/orders/{order_id}", headers=auth(intruder))
            assert_error(got, 404, "not_found")
            for if_match in ('"1"', '"2"', "*"):
                confirm = await client.patch(
                    f"/orders/{order_id}/confirm",
                    headers=auth(intruder, If_Match=if_match),
                    json={"totalCents": 1},
                )
                assert_error(confirm, 404, "not_found")
            for headers in (auth(intruder), auth(intruder, If_Match='"2"')):
                closed = await client.post(f"/orders/{order_id}/close", headers=headers)
                assert_error(closed, 404, "not_found")
        listing = await client.get("/orders", headers=auth(intruder), params={"limit": 100})
        assert listing.status_code == 200
        assert listing.json() == {"items": [], "nextCursor": None}
    for order_id, before in snapshot.items():
        assert await get_order(client, owner, order_id) == before
        assert await outbox_rows(db, order_id) == []
    listed = await client.get("/orders", headers=auth(owner))
    assert {item["id"] for item in listed.json()["items"]} == set(snapshot)


async def test_lists_do_not_mix_tenants(client: httpx.AsyncClient, tenant: str) -> None:
    mine = {(await create_order(client, tenant))["id"] for _ in range(3)}
    theirs = {(await create_order(client, tenant + "-2"))["id"] for _ in range(3)}
    await close_order(client, tenant + "-2", (await confirmed_order(client, tenant + "-2"))["id"])
    listed = await client.get("/orders", headers=auth(tenant), params={"limit": 100})
    assert {item["id"] for item in listed.json()["items"]} == mine
    assert all(item["tenantId"] == tenant for item in listed.json()["items"])
    other = await client.get("/orders", headers=auth(tenant + "-2"), params={"limit": 100})
    assert theirs < {item["id"] for item in other.json()["items"]}
    assert len(other.json()["items"]) == 4


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json", "/docs", "/metrics"])
async def test_operational_endpoints_need_no_tenant(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.get(path)).status_code == 200
