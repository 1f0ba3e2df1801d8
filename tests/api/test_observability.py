"""Request ids, JSON logs and OpenTelemetry spans around handlers and SQL statements."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import structlog
from asgi_lifespan import LifespanManager
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.types import ASGIApp

from orders_api.app import create_app
from orders_api.orders.service import OrderService
from tests.api.support import assert_error, confirmed_order, create_order
from tests.helpers import auth, make_settings

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


async def test_request_id_is_echoed(client: httpx.AsyncClient, tenant: str) -> None:
    response = await client.get("/orders", headers=auth(tenant, X_Request_ID="req-abc.123:x"))
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "req-abc.123:x"
    assert len(response.headers.get_list("X-Request-ID")) == 1


async def test_request_id_is_generated_when_absent(client: httpx.AsyncClient, tenant: str) -> None:
    first = await client.get("/orders", headers=auth(tenant))
    second = await client.get("/orders", headers=auth(tenant))
    assert GENERATED_ID.fullmatch(first.headers["X-Request-ID"])
    assert GENERATED_ID.fullmatch(second.headers["X-Request-ID"])
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


@pytest.mark.parametrize("incoming", ["", "has space", "x" * 129, "new\u00e9line", "a;b"])
async def test_unusable_request_id_is_replaced(
    client: httpx.AsyncClient, tenant: str, incoming: str
) -> None:
    headers = {b"X-Tenant-Id": tenant.encode(), b"X-Request-ID": incoming.encode()}
    response = await client.get("/orders", headers=headers)
    assert response.status_code == 200
    assert GENERATED_ID.fullmatch(response.headers["X-Request-ID"])


@pytest.fixture
async def quiet_client(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def test_request_id_is_on_every_error_response(
    quiet_client: httpx.AsyncClient, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = quiet_client
    draft = await create_order(client, tenant)

    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("boom")

    async def big_body() -> AsyncIterator[bytes]:
        for _ in range(17):
            yield b" " * 65536

    def rid(name: str) -> dict[str, str]:
        return {"X-Request-ID": f"rid-{name}"}

    requests = {
        "400": client.post("/orders", headers=auth(tenant, **{"X_Request_ID": "rid-400"})),
        "401": client.get("/orders", headers=rid("401")),
        "404": client.get("/nope", headers=rid("404")),
        "405": client.delete("/orders", headers=rid("405")),
        "409": client.post(f"/orders/{draft['id']}/close", headers={**auth(tenant), **rid("409")}),
        "413": client.post(
            "/orders",
            headers={**auth(tenant, Idempotency_Key="k"), **rid("413")},
            content=b" " * (2 * 1024 * 1024),
        ),
        "413s": client.post(
            "/orders",
            headers={**auth(tenant, Idempotency_Key="k"), **rid("413s")},
            content=big_body(),
        ),
        "415": client.post(
            "/orders",
            headers={**auth(tenant, Idempotency_Key="k", Content_Type="text/plain"), **rid("415")},
            content=b"x",
        ),
        "428": client.patch(
            f"/orders/{draft['id']}/confirm",
            headers={**auth(tenant), **rid("428")},
            json={"totalCents": 1},
        ),
    }
    for name, pending in requests.items():
        response = await pending
        assert response.status_code == int(name[:3]), (name, response.text)
        assert response.headers["X-Request-ID"] == f"rid-{name}"
    monkeypatch.setattr(OrderService, "list_page", broken)
    crashed = await client.get("/orders", headers={**auth(tenant), **rid("500")})
    assert_error(crashed, 500, "internal_error")
    assert crashed.headers["X-Request-ID"] == "rid-500"


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Root-logger output rendered by the app's own formatter (the one that writes stderr)."""
    root = logging.getLogger()
    (formatter,) = [
        handler.formatter
        for handler in root.handlers
        if isinstance(handler.formatter, structlog.stdlib.ProcessorFormatter)
    ]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    try:
        yield stream
    finally:
        root.removeHandler(handler)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert lines
    return [json.loads(line) for line in lines]  # every line is one JSON object


async def test_logs_are_json_with_the_request_id(
    quiet_client: httpx.AsyncClient, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("kaput")

    monkeypatch.setattr(OrderService, "get", broken)
    with captured_logs() as stream:
        sent = await quiet_client.get(
            f"/orders/{uuid.uuid4()}", headers=auth(tenant, X_Request_ID="log-me-1")
        )
        generated = await quiet_client.get(f"/orders/{uuid.uuid4()}", headers=auth(tenant))
    assert sent.status_code == generated.status_code == 500
    records = json_lines(stream)
    for record in records:
        assert {"event", "level", "timestamp", "request_id"} <= set(record)
    mine = [record for record in records if record["request_id"] == "log-me-1"]
    assert {"unhandled error", "request"} <= {record["event"] for record in mine}
    crash = next(record for record in mine if record["event"] == "unhandled error")
    assert crash["level"] == "error"
    assert "RuntimeError: kaput" in crash["exception"]  # the traceback goes to the log only
    other_id = generated.headers["X-Request-ID"]
    assert any(record["request_id"] == other_id for record in records)
    assert not any(
        record["request_id"] == "log-me-1" and record["request_id"] == other_id
        for record in records
    )


@pytest.fixture
async def traced(
    database_url: str,
) -> AsyncIterator[tuple[httpx.AsyncClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    application = create_app(make_settings(database_url), tracer_provider=provider)
    # The lifespan runs through the OpenTelemetry middleware too, as under a server.
    async with LifespanManager(application) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http, exporter


def server_span(spans: list[ReadableSpan], route: str, method: str) -> ReadableSpan:
    matches = [
        span
        for span in spans
        if span.kind == SpanKind.SERVER
        and span.attributes is not None
        and span.attributes.get("http.route") == route
        and span.name.startswith(method)
    ]
    assert len(matches) == 1, [span.name for span in spans if span.kind == SpanKind.SERVER]
    return matches[0]


def sql_in_trace(spans: list[ReadableSpan], server: ReadableSpan) -> list[str]:
    assert server.context is not None
    statements = []
    for span in spans:
        if span.kind != SpanKind.CLIENT or span.context is None or span.attributes is None:
            continue
        if span.context.trace_id != server.context.trace_id:
            continue
        statement = span.attributes.get("db.statement") or span.attributes.get("db.query.text")
        if statement is not None:
            statements.append(str(statement))
    return statements


async def test_spans_around_each_handler_and_each_sql_statement(
    traced: tuple[httpx.AsyncClient, InMemorySpanExporter], tenant: str
) -> None:
    client, exporter = traced
    order = await confirmed_order(client, tenant)
    got = await client.get(f"/orders/{order['id']}", headers=auth(tenant))
    assert got.status_code == 200
    listed = await client.get("/orders", headers=auth(tenant))
    assert listed.status_code == 200
    spans = list(exporter.get_finished_spans())

    create = server_span(spans, "/orders", "POST")
    create_sql = sql_in_trace(spans, create)
    assert any("INSERT INTO idempotency_keys" in sql for sql in create_sql), create_sql
    assert any("INSERT INTO orders" in sql for sql in create_sql), create_sql

    confirm = server_span(spans, "/orders/{order_id}/confirm", "PATCH")
    assert any("UPDATE orders" in sql for sql in sql_in_trace(spans, confirm))

    read = server_span(spans, "/orders/{order_id}", "GET")
    read_sql = sql_in_trace(spans, read)
    assert any(sql.startswith("SELECT") and "FROM orders" in sql for sql in read_sql), read_sql

    page = server_span(spans, "/orders", "GET")
    assert any("FROM orders" in sql for sql in sql_in_trace(spans, page))

    # Every SQL span belongs to a request's trace: nothing runs outside a handler span.
    request_traces = {
        span.context.trace_id
        for span in spans
        if span.kind == SpanKind.SERVER and span.context is not None
    }
    for span in spans:
        if span.kind == SpanKind.CLIENT and span.context is not None:
            assert span.context.trace_id in request_traces, (span.name, span.attributes)
