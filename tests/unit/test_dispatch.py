"""The one dispatch path: the orders routes go straight to their endpoints, everything else to
FastAPI; errors of either side come out as {code, message}, with the request id.

The app runs its lifespan on a database that is never reached (a closed port, and a configured
cursor secret so that start-up reads nothing): none of these requests gets to the database.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from orders_api.app import create_app
from orders_api.errors import database_error
from orders_api.orders.service import OrderService
from tests.helpers import auth, free_port, make_settings

SOME_ID = str(uuid.uuid4())
ORDERS_ROUTES = [
    ("POST", "/orders"),
    ("GET", "/orders"),
    ("GET", f"/orders/{SOME_ID}"),
    ("PATCH", f"/orders/{SOME_ID}/confirm"),
    ("POST", f"/orders/{SOME_ID}/close"),
]


@pytest.fixture
async def offline() -> AsyncIterator[httpx.AsyncClient]:
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    app = create_app(make_settings(url, cursor_secret="unit"))
    async with LifespanManager(app) as manager:
        # As a server would: the response of a bug is sent, the exception goes on to its log.
        transport = httpx.ASGITransport(app=manager.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


@pytest.fixture
def fastapi_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(method, path) of every request that reaches the FastAPI app."""
    calls: list[tuple[str, str]] = []
    original = FastAPI.__call__

    async def spy(self: FastAPI, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            calls.append((scope["method"], scope["path"]))
        await original(self, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", spy)
    return calls


@pytest.mark.parametrize(("method", "path"), ORDERS_ROUTES)
async def test_orders_routes_never_reach_fastapi(
    offline: httpx.AsyncClient, fastapi_calls: list[tuple[str, str]], method: str, path: str
) -> None:
    response = await offline.request(method, path)  # no tenant: the endpoint answers 401
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"
    assert fastapi_calls == []


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/orders", "GET, HEAD, POST"),
        ("PUT", f"/orders/{SOME_ID}", "GET, HEAD"),
        ("GET", f"/orders/{SOME_ID}/confirm", "PATCH"),
        ("PATCH", f"/orders/{SOME_ID}/close", "POST"),
    ],
)
async def test_another_method_on_an_orders_path_goes_to_fastapi_for_its_405(
    offline: httpx.AsyncClient,
    fastapi_calls: list[tuple[str, str]],
    method: str,
    path: str,
    allow: str,
) -> None:
    response = await offline.request(method, path, headers=auth("t"))
    assert response.status_code == 405
    assert response.json() == {"code": "method_not_allowed", "message": "method not allowed"}
    assert set(response.headers["Allow"].split(", ")) == set(allow.split(", "))
    assert fastapi_calls == [(method, path)]


@pytest.mark.parametrize("path", ["/", "/nope", "/orders/a/b/c", f"/orders/{SOME_ID}/cancel"])
async def test_an_unknown_path_is_a_404_in_the_error_shape(
    offline: httpx.AsyncClient, fastapi_calls: list[tuple[str, str]], path: str
) -> None:
    response = await offline.get(path, headers=auth("t", X_Request_ID="r-404"))
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": "not_found", "message": "resource not found"}
    assert response.headers["X-Request-ID"] == "r-404"
    assert fastapi_calls == [("GET", path)]


async def test_ops_routes_are_fastapis(
    offline: httpx.AsyncClient, fastapi_calls: list[tuple[str, str]]
) -> None:
    assert (await offline.get("/healthz")).json() == {"status": "ok"}
    assert fastapi_calls == [("GET", "/healthz")]


async def test_a_bug_in_an_orders_endpoint_is_the_bland_500_with_the_request_id(
    offline: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("SELECT secret -- password=hunter2")

    monkeypatch.setattr(OrderService, "get", broken)
    response = await offline.get(f"/orders/{SOME_ID}", headers=auth("t", X_Request_ID="r-500"))
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"code": "internal_error", "message": "internal error"}
    assert response.headers["X-Request-ID"] == "r-500"


async def test_the_bug_goes_on_up_to_the_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the 500 is sent the exception is re-raised, so that the server logs it too."""

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("kaput")

    monkeypatch.setattr(OrderService, "get", broken)
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    async with LifespanManager(create_app(make_settings(url, cursor_secret="unit"))) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            with pytest.raises(RuntimeError, match="kaput"):
                await http.get(f"/orders/{SOME_ID}", headers=auth("t"))


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (asyncpg.CannotConnectNowError("the database system is starting up"), 503, "unavailable"),
        (ConnectionRefusedError("refused"), 503, "unavailable"),
        (asyncpg.LockNotAvailableError("lock timeout"), 409, "conflict"),
        (asyncpg.UndefinedTableError('relation "orders" does not exist'), 500, "internal_error"),
    ],
)
async def test_a_database_error_in_an_orders_endpoint_is_translated(
    offline: httpx.AsyncClient,
    monkeypatch: pytest.MonkeyPatch,
    error: BaseException,
    status: int,
    code: str,
) -> None:
    async def failing(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(OrderService, "get", failing)
    response = await offline.get(f"/orders/{SOME_ID}", headers=auth("t"))
    assert response.status_code == status
    body = response.json()
    assert body["code"] == code
    assert set(body) <= {"code", "message", "details"}
    for word in ("relation", "orders", "refused", "lock timeout", "starting up"):
        assert word not in response.text


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (asyncpg.LockNotAvailableError("lock timeout"), 409, "request_in_progress"),
        (asyncpg.QueryCanceledError("statement timeout"), 503, None),
        (TimeoutError(), 503, None),
        (asyncpg.AdminShutdownError("shutting down"), 503, None),
        (asyncpg.CrashShutdownError("crash"), 503, None),
        (asyncpg.CannotConnectNowError("starting up"), 503, None),
        (asyncpg.TooManyConnectionsError("too many"), 503, None),
        (asyncpg.ReadOnlySQLTransactionError("read-only transaction"), 503, None),
        (asyncpg.ConnectionFailureError("connection failure"), 503, None),
        (asyncpg.ConnectionDoesNotExistError("closed mid-operation"), 503, None),
        (asyncpg.InterfaceError("connection is closed"), 503, None),
        (asyncpg.InternalClientError("protocol state"), 503, None),
        (OSError("network is unreachable"), 503, None),
    ],
)
def test_database_errors_the_client_should_retry(
    error: BaseException, status: int, reason: str | None
) -> None:
    translated = database_error(error)
    assert translated is not None
    assert translated.status == status
    assert (translated.details or {}).get("reason") == reason
    assert translated.headers == {"Retry-After": "1"}


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.UndefinedTableError("no such relation"),
        asyncpg.DataError("invalid input"),
    ],
)
def test_other_database_errors_are_bugs(error: BaseException) -> None:
    assert database_error(error) is None
