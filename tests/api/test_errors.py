"""Every error path answers {code, message[, details]} and nothing else."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from starlette.types import ASGIApp

from orders_api.app import create_app
from orders_api.orders.service import OrderService
from tests.api.support import assert_error, confirmed_order, create_order, get_order, outbox_rows
from tests.helpers import auth, free_port, make_settings, with_database

MIB = 1024 * 1024
SOME_ID = str(uuid.uuid4())
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
INTERNALS = (
    "select",
    "traceback",
    "runtimeerror",
    "sqlite",
    "asyncpg",
    "psycopg",
    "hunter2",
    "no_such_column",
    'file "',
    "line ",
)


def assert_no_internals(response: httpx.Response) -> None:
    lowered = response.text.lower()
    for word in INTERNALS:
        assert word not in lowered, (word, response.text)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/nope"),
        ("GET", "/ORDERS"),
        ("POST", "/orderz"),
        ("GET", f"/orders/{SOME_ID}/cancel"),
        ("POST", f"/orders/{SOME_ID}/confirm/extra"),
        ("GET", "/orders/a/b/c/d"),
        ("DELETE", "/static/swagger-ui.css"),
    ],
)
async def test_unknown_routes_are_not_found(
    client: httpx.AsyncClient, tenant: str, method: str, path: str
) -> None:
    response = await client.request(method, path, headers=auth(tenant))
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/orders", {"GET", "HEAD", "POST"}),
        ("PUT", "/orders", {"GET", "HEAD", "POST"}),
        ("PATCH", "/orders", {"GET", "HEAD", "POST"}),
        ("DELETE", f"/orders/{SOME_ID}", {"GET", "HEAD"}),
        ("POST", f"/orders/{SOME_ID}", {"GET", "HEAD"}),
        ("PUT", f"/orders/{SOME_ID}", {"GET", "HEAD"}),
        ("GET", f"/orders/{SOME_ID}/confirm", {"PATCH"}),
        ("POST", f"/orders/{SOME_ID}/confirm", {"PATCH"}),
        ("GET", f"/orders/{SOME_ID}/close", {"POST"}),
        ("PATCH", f"/orders/{SOME_ID}/close", {"POST"}),
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("DELETE", "/readyz", {"GET", "HEAD"}),
        ("PUT", "/metrics", {"GET", "HEAD"}),
    ],
)
async def test_method_not_allowed_lists_every_method_of_the_path(
    client: httpx.AsyncClient, tenant: str, method: str, path: str, allow: set[str]
) -> None:
    response = await client.request(method, path, headers=auth(tenant))
    assert_error(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(", ")) == allow


@pytest.mark.parametrize(
    "path",
    [
        "/orders",
        f"/orders/{SOME_ID}",
        f"/orders/{SOME_ID}/confirm",
        f"/orders/{SOME_ID}/close",
        "/healthz",
        "/readyz",
        "/openapi.json",
        "/docs",
    ],
)
async def test_allow_header_matches_what_the_path_answers(
    client: httpx.AsyncClient, tenant: str, path: str
) -> None:
    """Allow names exactly the methods that do not answer 405, whatever the method tried."""
    answered = {}
    for method in METHODS:
        answered[method] = await client.request(method, path, headers=auth(tenant))
    refused = {m: r for m, r in answered.items() if r.status_code == 405}
    assert refused
    for response in refused.values():
        assert set(response.headers["Allow"].split(", ")) == set(METHODS) - set(refused)


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/orders", {"Idempotency-Key": "k-json"}),
        ("PATCH", f"/orders/{SOME_ID}/confirm", {"If-Match": '"1"'}),
        ("POST", f"/orders/{SOME_ID}/close", {}),
    ],
)
@pytest.mark.parametrize("content", [b"{", b'{"a":}', b"\xff\xfe", b"[1,", b"{'a': 1}", b"nul"])
async def test_malformed_json_is_a_validation_error(
    client: httpx.AsyncClient,
    tenant: str,
    method: str,
    path: str,
    headers: dict[str, str],
    content: bytes,
) -> None:
    response = await client.request(
        method,
        path,
        headers=auth(tenant, Content_Type="application/json", **headers),
        content=content,
    )
    assert_error(response, 400, "validation_error")


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/orders", {"Idempotency-Key": "k-415"}),
        ("PATCH", f"/orders/{SOME_ID}/confirm", {"If-Match": '"1"'}),
        ("POST", f"/orders/{SOME_ID}/close", {}),
    ],
)
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_non_json_body_is_unsupported_media_type(
    client: httpx.AsyncClient,
    tenant: str,
    method: str,
    path: str,
    headers: dict[str, str],
    content_type: str,
) -> None:
    response = await client.request(
        method, path, headers=auth(tenant, Content_Type=content_type, **headers), content=b"{}"
    )
    assert_error(response, 415, "unsupported_media_type")


def padded_empty_object(size: int) -> bytes:
    """A valid JSON `{}` of exactly `size` bytes (whitespace inside)."""
    return b"{" + b" " * (size - 2) + b"}"


async def chunks(body: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def stored_keys(db: asyncpg.Pool, tenant: str) -> int:
    value = await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE tenant_id = $1", tenant)
    return int(value)


@pytest.mark.parametrize("streamed", [False, True])
async def test_body_over_one_mib_is_payload_too_large(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, streamed: bool
) -> None:
    body = padded_empty_object(MIB + 1)
    request = client.build_request(
        "POST",
        "/orders",
        headers=auth(tenant, Idempotency_Key="k-big", Content_Type="application/json"),
        content=chunks(body) if streamed else body,
    )
    if streamed:
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
    else:
        assert request.headers["content-length"] == str(MIB + 1)
    response = await client.send(request)
    assert_error(response, 413, "payload_too_large")
    assert await stored_keys(db, tenant) == 0


@pytest.mark.parametrize("streamed", [False, True])
async def test_body_of_exactly_one_mib_is_accepted(
    client: httpx.AsyncClient, tenant: str, streamed: bool
) -> None:
    body = padded_empty_object(MIB)
    response = await client.post(
        "/orders",
        headers=auth(tenant, Idempotency_Key="k-mib", Content_Type="application/json"),
        content=chunks(body) if streamed else body,
    )
    assert response.status_code == 201, response.text


@pytest.mark.parametrize("streamed", [False, True])
async def test_oversized_confirm_and_close_change_nothing(
    client: httpx.AsyncClient, db: asyncpg.Pool, tenant: str, streamed: bool
) -> None:
    draft = await create_order(client, tenant)
    confirmed = await confirmed_order(client, tenant)
    body = b'{"totalCents": 1' + b" " * MIB + b"}"
    confirm = await client.patch(
        f"/orders/{draft['id']}/confirm",
        headers=auth(tenant, If_Match='"1"', Content_Type="application/json"),
        content=chunks(body) if streamed else body,
    )
    assert_error(confirm, 413, "payload_too_large")
    assert (await get_order(client, tenant, draft["id"]))["status"] == "draft"
    close = await client.post(
        f"/orders/{confirmed['id']}/close",
        headers=auth(tenant, Content_Type="application/json"),
        content=chunks(padded_empty_object(2 * MIB)) if streamed else padded_empty_object(2 * MIB),
    )
    assert_error(close, 413, "payload_too_large")
    assert (await get_order(client, tenant, confirmed["id"]))["status"] == "confirmed"
    assert await outbox_rows(db, confirmed["id"]) == []


@pytest.fixture
async def quiet_client(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    """A client that, like a real server, gets the 500 response instead of the exception."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def test_unexpected_bug_is_a_bland_internal_error(
    quiet_client: httpx.AsyncClient, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("SELECT secret FROM orders -- asyncpg password=hunter2")

    monkeypatch.setattr(OrderService, "get", broken)
    response = await quiet_client.get(
        f"/orders/{SOME_ID}", headers=auth(tenant, X_Request_ID="bug-1")
    )
    body = assert_error(response, 500, "internal_error")
    assert body == {"code": "internal_error", "message": "internal error"}
    assert_no_internals(response)
    assert response.headers["X-Request-ID"] == "bug-1"


async def test_bug_in_a_write_is_a_bland_internal_error(
    quiet_client: httpx.AsyncClient, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyError("hunter2")

    monkeypatch.setattr(OrderService, "create", broken)
    response = await quiet_client.post("/orders", headers=auth(tenant, Idempotency_Key="k-bug"))
    assert assert_error(response, 500, "internal_error") == {
        "code": "internal_error",
        "message": "internal error",
    }
    assert_no_internals(response)


@pytest.fixture
async def unmigrated(server_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """An app on a database nobody migrated: every statement fails with a driver error.

    A cursor secret is configured, so that the lifespan need not read app_secrets."""
    name = f"orders_empty_{uuid.uuid4().hex[:12]}"
    await _run_admin(server_url, f'CREATE DATABASE "{name}"')
    try:
        settings = make_settings(with_database(server_url, name), cursor_secret="s")
        async with LifespanManager(create_app(settings)) as manager:
            transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                yield http
    finally:
        await _run_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _run_admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("POST", "/orders", {"Idempotency-Key": "k-1"}),
        ("GET", "/orders", {}),
        ("GET", f"/orders/{SOME_ID}", {}),
        ("POST", f"/orders/{SOME_ID}/close", {}),
    ],
)
async def test_sql_error_leaks_no_sql_or_driver_text(
    unmigrated: httpx.AsyncClient, tenant: str, method: str, path: str, headers: dict[str, str]
) -> None:
    response = await unmigrated.request(method, path, headers={**auth(tenant), **headers})
    assert assert_error(response, 500, "internal_error") == {
        "code": "internal_error",
        "message": "internal error",
    }
    assert_no_internals(response)
    for word in ("orders", "idempotency_keys", "app_secrets", "relation", "table"):
        assert word not in response.text


@pytest.fixture
async def unreachable() -> AsyncIterator[httpx.AsyncClient]:
    """An app whose database cannot be reached (a closed port). A cursor secret is configured:
    without one the lifespan reads it from the database, and start-up would fail."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/orders"
    async with LifespanManager(create_app(make_settings(url, cursor_secret="s"))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


@pytest.mark.parametrize(
    ("method", "path", "kwargs"),
    [
        ("POST", "/orders", {"headers": {"Idempotency-Key": "k-1"}}),
        ("GET", "/orders", {}),
        ("GET", "/orders?limit=5", {}),
        ("GET", f"/orders/{SOME_ID}", {}),
        (
            "PATCH",
            f"/orders/{SOME_ID}/confirm",
            {"headers": {"If-Match": '"1"'}, "json": {"totalCents": 1}},
        ),
        ("POST", f"/orders/{SOME_ID}/close", {}),
    ],
)
async def test_database_unreachable_is_unavailable(
    unreachable: httpx.AsyncClient, tenant: str, method: str, path: str, kwargs: dict[str, Any]
) -> None:
    headers = {**auth(tenant), **kwargs.get("headers", {})}
    body = {name: value for name, value in kwargs.items() if name != "headers"}
    response = await unreachable.request(method, path, headers=headers, **body)
    assert_error(response, 503, "unavailable")
    assert_no_internals(response)


async def test_readyz_is_unavailable_while_healthz_stays_up(
    unreachable: httpx.AsyncClient,
) -> None:
    ready = await unreachable.get("/readyz")
    assert_error(ready, 503, "unavailable")
    assert_no_internals(ready)
    health = await unreachable.get("/healthz")
    assert health.status_code == 200


async def test_readyz_is_ready_with_a_database(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}
