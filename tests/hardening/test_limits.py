"""Abuse limits seen by the app: key, header, query and body bounds; lock and statement timeouts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from prometheus_client import REGISTRY

from orders_api.app import create_app
from tests.helpers import auth, make_settings


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body: dict[str, Any] = response.json()
    assert set(body) in ({"code", "message"}, {"code", "message", "details"}), body
    assert body["code"] == code, body
    return body


@asynccontextmanager
async def app_client(database_url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app of its own, built with these settings, on the session's database."""
    async with LifespanManager(create_app(make_settings(database_url, **settings))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


# --- lengths and bounds -------------------------------------------------------------------


async def test_idempotency_key_is_bounded(client: httpx.AsyncClient, tenant: str) -> None:
    accepted = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k" * 255))
    assert accepted.status_code == 201
    keys = [b"k" * 256, b"k" * 10_000, b"", b"k y", "ключ".encode()]
    for key in keys:
        response = await client.post(
            "/orders", headers={b"X-Tenant-Id": tenant.encode(), b"Idempotency-Key": key}
        )
        assert_error(response, 400, "validation_error")


async def test_tenant_is_bounded(client: httpx.AsyncClient) -> None:
    assert (await client.get("/orders", headers=auth("t" * 64))).status_code == 200
    for tenant in ("t" * 65, "t" * 10_000, "", "a b", "t/1"):
        assert_error(
            await client.get("/orders", headers={"X-Tenant-Id": tenant}), 401, "unauthorized"
        )


@pytest.mark.parametrize("limit", ["0", "101", "-1", "1e3", "abc", "9" * 50, ""])
async def test_limit_is_bounded(client: httpx.AsyncClient, tenant: str, limit: str) -> None:
    response = await client.get("/orders", params={"limit": limit}, headers=auth(tenant))
    assert_error(response, 400, "validation_error")


async def test_limit_bounds_are_inclusive(client: httpx.AsyncClient, tenant: str) -> None:
    for limit in ("1", "100"):
        response = await client.get("/orders", params={"limit": limit}, headers=auth(tenant))
        assert response.status_code == 200


@pytest.mark.parametrize(
    ("name", "value"),
    [("cursor", "A" * 257), ("cursor", "A" * 60_000)],
)
async def test_long_query_values_are_refused(
    client: httpx.AsyncClient, tenant: str, name: str, value: str
) -> None:
    response = await client.get("/orders", params={name: value}, headers=auth(tenant))
    assert_error(response, 400, "validation_error")


async def test_long_if_match_is_refused(client: httpx.AsyncClient, tenant: str) -> None:
    order_id = (await client.post("/orders", headers=auth(tenant, Idempotency_Key="k"))).json()[
        "id"
    ]
    response = await client.patch(
        f"/orders/{order_id}/confirm",
        json={"totalCents": 1},
        headers=auth(tenant, If_Match=", ".join(['"1"'] * 300)),
    )
    assert_error(response, 400, "validation_error")


async def test_a_long_path_is_a_plain_404(client: httpx.AsyncClient, tenant: str) -> None:
    response = await client.get(f"/orders/{'x' * 20_000}", headers=auth(tenant))
    assert_error(response, 404, "not_found")


async def test_oversized_headers_are_refused_before_any_route(
    client: httpx.AsyncClient, tenant: str
) -> None:
    big = await client.get("/healthz", headers={"X-Padding": "a" * 20_000})
    body = assert_error(big, 400, "validation_error")
    assert body["details"] == {"reason": "headers_too_large"}
    many = {f"X-H{i}": "v" * 20 for i in range(1_000)}
    assert_error(
        await client.get("/orders", headers={**auth(tenant), **many}), 400, "validation_error"
    )
    # Ordinary requests carry far less and pass.
    normal = await client.get("/orders", headers=auth(tenant, X_Padding="a" * 4_000))
    assert normal.status_code == 200


async def test_header_limit_is_configurable(database_url: str, tenant: str) -> None:
    async with app_client(database_url, max_header_bytes=64 * 1024) as client:
        response = await client.get("/orders", headers=auth(tenant, X_Padding="a" * 40_000))
        assert response.status_code == 200
        response = await client.get("/orders", headers=auth(tenant, X_Padding="a" * 70_000))
        assert_error(response, 400, "validation_error")


async def test_a_body_of_exactly_the_limit_is_read(client: httpx.AsyncClient, tenant: str) -> None:
    body = b"{}" + b" " * (1024 * 1024 - 2)
    response = await client.post(
        "/orders",
        content=body,
        headers=auth(tenant, Idempotency_Key="k", Content_Type="application/json"),
    )
    assert response.status_code == 201


async def test_a_body_over_the_limit_is_a_413(client: httpx.AsyncClient, tenant: str) -> None:
    body = b"{}" + b" " * (1024 * 1024 - 1)
    response = await client.post(
        "/orders",
        content=body,
        headers=auth(tenant, Idempotency_Key="k", Content_Type="application/json"),
    )
    assert_error(response, 413, "payload_too_large")
    # Nothing was stored: the key is still free.
    retry = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k"))
    assert retry.status_code == 201


async def test_a_streamed_body_over_the_limit_is_a_413(
    client: httpx.AsyncClient, tenant: str
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}"
        for _ in range(20):
            yield b" " * 65_536

    response = await client.post(
        "/orders",
        content=chunks(),
        headers=auth(tenant, Idempotency_Key="k", Content_Type="application/json"),
    )
    assert_error(response, 413, "payload_too_large")


# --- lock and statement timeouts ----------------------------------------------------------


@asynccontextmanager
async def postgres_row_lock(database_url: str, order_id: str) -> AsyncIterator[None]:
    """Another session holding the order's row lock, as a slow transaction would."""
    conn = await asyncpg.connect(database_url)
    try:
        transaction = conn.transaction()
        await transaction.start()
        locked = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM orders WHERE id = $1 FOR UPDATE) AS l",
            uuid.UUID(order_id),
        )
        assert locked == 1
        yield
        await transaction.rollback()
    finally:
        await conn.close()


def assert_pool_idle() -> None:
    """No connection left checked out: a timed-out request gave its connection back."""
    in_use = REGISTRY.get_sample_value(
        "orders_api_db_pool_connections", {"pool": "api", "state": "in_use"}
    )
    assert in_use == 0


@pytest.mark.parametrize(
    ("timeouts", "expected"),
    [
        # lock_timeout first: PostgreSQL says 55P03 -> 409 request_in_progress (retry later).
        ({"db_lock_timeout_ms": 300, "db_statement_timeout_ms": 5000}, (409, "conflict")),
        # statement_timeout first: 57014 -> 503 unavailable.
        ({"db_lock_timeout_ms": 5000, "db_statement_timeout_ms": 300}, (503, "unavailable")),
    ],
)
async def test_a_held_lock_is_answered_within_the_timeout_not_hung(
    database_url: str,
    tenant: str,
    timeouts: dict[str, int],
    expected: tuple[int, str],
) -> None:
    # One connection: had the timed-out request kept it, the retry below would wait in vain.
    async with app_client(database_url, db_pool_size=1, **timeouts) as client:
        created = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k"))
        order_id = created.json()["id"]
        async with postgres_row_lock(database_url, order_id):
            started = time.monotonic()
            response = await asyncio.wait_for(
                client.patch(
                    f"/orders/{order_id}/confirm",
                    json={"totalCents": 5},
                    headers=auth(tenant, If_Match='"1"'),
                ),
                timeout=4,
            )
            elapsed = time.monotonic() - started
        status, code = expected
        body = assert_error(response, status, code)
        if status == 409:
            assert body["details"] == {"reason": "request_in_progress"}
        assert response.headers["Retry-After"] == "1"
        assert elapsed < 2.5
        assert_pool_idle()
        # The lock is gone: the same request now goes through, nothing was changed before.
        retry = await client.patch(
            f"/orders/{order_id}/confirm",
            json={"totalCents": 5},
            headers=auth(tenant, If_Match='"1"'),
        )
        assert retry.status_code == 200, retry.text
        assert retry.json()["version"] == 2


async def test_a_create_behind_a_held_write_is_answered_and_stores_nothing(
    database_url: str, tenant: str
) -> None:
    async with app_client(database_url, db_pool_size=1, db_lock_timeout_ms=300) as client:
        # A transaction that claimed the same key and has not committed yet.
        conn = await asyncpg.connect(database_url)
        try:
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute(
                "INSERT INTO idempotency_keys (tenant_id, key, request_hash, status_code,"
                " response_json, created_at) VALUES ($1, 'k', 'x', 201, '{}', now())",
                tenant,
            )
            started = time.monotonic()
            response = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k"))
            elapsed = time.monotonic() - started
            await transaction.rollback()
        finally:
            await conn.close()
        body = assert_error(response, 409, "conflict")
        assert body["details"] == {"reason": "request_in_progress"}
        assert elapsed < 2.5
        assert_pool_idle()
        retry = await client.post("/orders", headers=auth(tenant, Idempotency_Key="k"))
        assert retry.status_code == 201
        stored = await client.get("/orders", headers=auth(tenant))
        assert len(stored.json()["items"]) == 1, "the refused create stored an order"
