"""Every error path answers {code, message[, details]} and nothing else."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from orders_api.app import create_app
from orders_api.db import idempotency_keys
from orders_api.orders import service
from tests.api.support import assert_error, confirmed_order, create_order, get_order, outbox_rows
from tests.conftest import TEST_DATABASE_URL
from tests.helpers import auth, make_settings

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
        ("DELETE", "/orders", {"GET", "POST"}),
        ("PUT", "/orders", {"GET", "POST"}),
        ("PATCH", "/orders", {"GET", "POST"}),
        ("DELETE", f"/orders/{SOME_ID}", {"GET"}),
        ("POST", f"/orders/{SOME_ID}", {"GET"}),
        ("PUT", f"/orders/{SOME_ID}", {"GET"}),
        ("GET", f"/orders/{SOME_ID}/confirm", {"PATCH"}),
        ("POST", f"/orders/{SOME_ID}/confirm", {"PATCH"}),
        ("GET", f"/orders/{SOME_ID}/close", {"POST"}),
        ("PATCH", f"/orders/{SOME_ID}/close", {"POST"}),
        ("POST", "/healthz", {"GET"}),
        ("DELETE", "/readyz", {"GET"}),
        ("PUT", "/metrics", {"GET"}),
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


async def stored_keys(engine: AsyncEngine, tenant: str) -> int:
    async with engine.connect() as conn:
        value = await conn.scalar(
            select(func.count())
            .select_from(idempotency_keys)
            .where(idempotency_keys.c.tenant_id == tenant)
        )
    return int(value or 0)


@pytest.mark.parametrize("streamed", [False, True])
async def test_body_over_one_mib_is_payload_too_large(
    client: httpx.AsyncClient, engine: AsyncEngine, tenant: str, streamed: bool
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
    assert await stored_keys(engine, tenant) == 0


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
    client: httpx.AsyncClient, engine: AsyncEngine, tenant: str, streamed: bool
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
    assert await outbox_rows(engine, confirmed["id"]) == []


@pytest.fixture
async def quiet_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client that, like a real server, gets the 500 response instead of the exception."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def test_unexpected_bug_is_a_bland_internal_error(
    quiet_client: httpx.AsyncClient, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("SELECT secret FROM orders -- asyncpg password=hunter2")

    monkeypatch.setattr(service, "get_order", broken)
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

    monkeypatch.setattr(service, "create_order", broken)
    response = await quiet_client.post("/orders", headers=auth(tenant, Idempotency_Key="k-bug"))
    assert assert_error(response, 500, "internal_error") == {
        "code": "internal_error",
        "message": "internal error",
    }
    assert_no_internals(response)


@pytest.fixture
async def unmigrated(backend: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An app on a database nobody migrated: every statement fails with a driver error."""
    name = f"orders_empty_{uuid.uuid4().hex[:12]}"
    admin = ""
    if backend == "postgresql":
        admin_url = make_url(TEST_DATABASE_URL).set(drivername="postgresql")
        admin = admin_url.render_as_string(hide_password=False)
        await _run_admin(admin, f'CREATE DATABASE "{name}"')
        url = admin_url.set(database=name).render_as_string(hide_password=False)
    else:
        url = f"sqlite:///{tmp_path / 'empty.db'}"
    try:
        application = create_app(make_settings(url))
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                yield http
    finally:
        if backend == "postgresql":
            await _run_admin(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
async def unreachable(backend: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """An app whose database cannot be reached: a closed port, or a path SQLite cannot open."""
    if backend == "postgresql":
        url = f"postgresql://postgres@127.0.0.1:{closed_port()}/orders"
    else:
        url = f"sqlite:///{tmp_path}"  # a directory: "unable to open database file"
    application = create_app(make_settings(url))
    async with application.router.lifespan_context(application):
        transport = httpx.ASGITransport(app=application)
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
