"""Conditional GET (If-None-Match -> 304) and HEAD on every GET route."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp

from tests.api.support import assert_error, confirm_order, create_order
from tests.helpers import auth

# Headers that differ from one request to the next by design.
PER_REQUEST = {"x-request-id", "date"}


async def confirmed(client: httpx.AsyncClient, tenant: str) -> str:
    """An order at version 2."""
    order = await create_order(client, tenant)
    await confirm_order(client, tenant, order["id"])
    return str(order["id"])


def assert_not_modified(response: httpx.Response, etag: str) -> None:
    assert response.status_code == 304, response.text
    assert response.headers["etag"] == etag
    assert response.content == b""
    assert "content-type" not in response.headers


@pytest.mark.parametrize(
    "held",
    ['"2"', 'W/"2"', "2", '"1", "2"', '"0",W/"2"', ' "7" ,\t"2" ', "*", " * "],
)
async def test_current_etag_is_not_modified(
    client: httpx.AsyncClient, tenant: str, held: str
) -> None:
    order_id = await confirmed(client, tenant)
    response = await client.get(f"/orders/{order_id}", headers=auth(tenant, If_None_Match=held))
    assert_not_modified(response, '"2"')


@pytest.mark.parametrize("held", ['"1"', 'W/"1"', '"1", "3"', '"0"', '"abc"', '""'])
async def test_another_etag_gets_the_order(
    client: httpx.AsyncClient, tenant: str, held: str
) -> None:
    order_id = await confirmed(client, tenant)
    plain = await client.get(f"/orders/{order_id}", headers=auth(tenant))
    response = await client.get(f"/orders/{order_id}", headers=auth(tenant, If_None_Match=held))
    assert response.status_code == 200, response.text
    assert response.headers["etag"] == '"2"'
    assert response.content == plain.content
    assert response.json()["version"] == 2
    assert response.json()["status"] == "confirmed"


async def test_revalidation_follows_the_order(client: httpx.AsyncClient, tenant: str) -> None:
    order = await create_order(client, tenant)
    path = f"/orders/{order['id']}"
    first = await client.get(path, headers=auth(tenant))
    etag = first.headers["etag"]
    assert etag == '"1"'
    assert_not_modified(await client.get(path, headers=auth(tenant, If_None_Match=etag)), etag)

    await confirm_order(client, tenant, order["id"])
    changed = await client.get(path, headers=auth(tenant, If_None_Match=etag))
    assert changed.status_code == 200
    assert changed.headers["etag"] == '"2"'
    assert changed.json()["totalCents"] == 1250
    assert_not_modified(await client.get(path, headers=auth(tenant, If_None_Match='"2"')), '"2"')


async def test_if_none_match_split_over_two_field_lines_is_one_list(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order_id = await confirmed(client, tenant)
    headers = [
        (b"x-tenant-id", tenant.encode()),
        (b"if-none-match", b'"1"'),
        (b"if-none-match", b'"2"'),
    ]
    response = await client.get(f"/orders/{order_id}", headers=headers)
    assert_not_modified(response, '"2"')


@pytest.mark.parametrize(
    "malformed",
    ['"2', "abc", "W/2", '"1" "2"', '"2",', ',"2"', '*, "2"', 'w/"2"', "", "2.0"],
)
async def test_malformed_if_none_match_is_a_400(
    client: httpx.AsyncClient, tenant: str, malformed: str
) -> None:
    order_id = await confirmed(client, tenant)
    response = await client.get(
        f"/orders/{order_id}", headers=auth(tenant, If_None_Match=malformed)
    )
    assert_error(response, 400, "validation_error")


@pytest.mark.parametrize("held", ["*", '"1"'])
async def test_unknown_order_is_a_404_whatever_is_held(
    client: httpx.AsyncClient, tenant: str, held: str
) -> None:
    response = await client.get(f"/orders/{uuid.uuid4()}", headers=auth(tenant, If_None_Match=held))
    assert_error(response, 404, "not_found")


async def test_another_tenants_order_is_a_404_even_with_star(
    client: httpx.AsyncClient, tenant: str
) -> None:
    order_id = await confirmed(client, f"{tenant}-other")
    for held in ("*", '"2"'):
        response = await client.get(f"/orders/{order_id}", headers=auth(tenant, If_None_Match=held))
        assert_error(response, 404, "not_found")


async def test_if_none_match_without_a_tenant_is_a_401(client: httpx.AsyncClient) -> None:
    response = await client.get(f"/orders/{uuid.uuid4()}", headers={"If-None-Match": "*"})
    assert_error(response, 401, "unauthorized")


# --- HEAD ------------------------------------------------------------------------------------


class RawASGITransport(httpx.AsyncBaseTransport):
    """Like httpx.ASGITransport, but keeps every body byte the app sends: httpx's own
    transport drops the body of a HEAD response, which would hide an app that sends one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(name.lower(), value) for name, value in request.headers.raw],
            "scheme": "http",
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "root_path": "",
            "server": ("test", 80),
            "client": ("127.0.0.1", 50000),
        }
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        status = 0
        headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []

        async def send(message: dict[str, Any]) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)  # type: ignore[arg-type]
        return httpx.Response(status, headers=headers, content=b"".join(chunks), request=request)


@pytest.fixture
async def raw(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    """A client that sees the bytes the app sends, HEAD bodies included."""
    async with httpx.AsyncClient(transport=RawASGITransport(app), base_url="http://test") as http:
        yield http


def comparable(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k not in PER_REQUEST}


async def assert_head_like_get(
    raw: httpx.AsyncClient, path: str, headers: dict[str, str], status: int = 200
) -> httpx.Response:
    got = await raw.get(path, headers=headers)
    head = await raw.head(path, headers=headers)
    assert got.status_code == status, got.text
    assert head.status_code == status
    assert head.content == b""
    assert comparable(head) == comparable(got)
    assert "x-request-id" in head.headers
    if got.content:
        assert head.headers["content-length"] == str(len(got.content))
    return head


async def test_head_on_an_order(raw: httpx.AsyncClient, tenant: str) -> None:
    order_id = await confirmed(raw, tenant)
    head = await assert_head_like_get(raw, f"/orders/{order_id}", auth(tenant))
    assert head.headers["etag"] == '"2"'
    assert head.headers["content-type"] == "application/json"


async def test_head_on_the_list(raw: httpx.AsyncClient, tenant: str) -> None:
    for _ in range(3):
        await create_order(raw, tenant)
    await assert_head_like_get(raw, "/orders?limit=2", auth(tenant))
    await assert_head_like_get(raw, "/orders?status=draft", auth(tenant))


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/openapi.json"])
async def test_head_on_the_ops_routes(raw: httpx.AsyncClient, path: str) -> None:
    await assert_head_like_get(raw, path, {})


async def test_head_on_metrics(raw: httpx.AsyncClient) -> None:
    got = await raw.get("/metrics")
    head = await raw.head("/metrics")
    assert head.status_code == got.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == got.headers["content-type"]


async def test_head_on_an_unknown_order_is_a_404_without_body(
    raw: httpx.AsyncClient, tenant: str
) -> None:
    head = await assert_head_like_get(raw, f"/orders/{uuid.uuid4()}", auth(tenant), 404)
    assert head.headers["content-type"] == "application/json"
    assert int(head.headers["content-length"]) > 0


async def test_head_without_a_tenant_is_a_401_without_body(raw: httpx.AsyncClient) -> None:
    await assert_head_like_get(raw, f"/orders/{uuid.uuid4()}", {}, 401)


async def test_head_with_a_bad_query_is_a_400_without_body(
    raw: httpx.AsyncClient, tenant: str
) -> None:
    await assert_head_like_get(raw, "/orders?status=open", auth(tenant), 400)


async def test_conditional_head(raw: httpx.AsyncClient, tenant: str) -> None:
    order_id = await confirmed(raw, tenant)
    head = await raw.head(f"/orders/{order_id}", headers=auth(tenant, If_None_Match='"2"'))
    assert_not_modified(head, '"2"')
    head = await raw.head(f"/orders/{order_id}", headers=auth(tenant, If_None_Match='"1"'))
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["etag"] == '"2"'


async def test_head_on_a_post_only_route_is_a_405_with_allow(
    raw: httpx.AsyncClient, tenant: str
) -> None:
    order_id = await confirmed(raw, tenant)
    head = await raw.head(f"/orders/{order_id}/close", headers=auth(tenant))
    assert head.status_code == 405
    assert head.content == b""
    assert {m.strip() for m in head.headers["allow"].split(",")} == {"POST"}
    head = await raw.head(f"/orders/{order_id}/confirm", headers=auth(tenant))
    assert head.status_code == 405
    assert {m.strip() for m in head.headers["allow"].split(",")} == {"PATCH"}
    # nothing happened to the order
    got = await raw.get(f"/orders/{order_id}", headers=auth(tenant))
    assert got.json()["status"] == "confirmed"


@pytest.mark.parametrize("path", ["/orders", "/orders/{id}", "/healthz"])
async def test_allow_lists_head_on_get_routes(
    raw: httpx.AsyncClient, tenant: str, path: str
) -> None:
    response = await raw.delete(path.format(id=uuid.uuid4()), headers=auth(tenant))
    assert_error(response, 405, "method_not_allowed")
    allowed = {m.strip() for m in response.headers["allow"].split(",")}
    assert {"GET", "HEAD"} <= allowed


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
async def test_head_on_the_docs(raw: httpx.AsyncClient, path: str) -> None:
    await assert_head_like_get(raw, path, {})


async def test_head_on_a_docs_asset(raw: httpx.AsyncClient) -> None:
    page = await raw.get("/docs")
    assets = re.findall(r'(?:src|href)="(/[^"]+\.(?:js|css))"', page.text)
    assert assets, page.text
    for asset in assets:
        await assert_head_like_get(raw, asset, {})


async def test_every_documented_get_route_answers_head(raw: httpx.AsyncClient, tenant: str) -> None:
    order_id = await confirmed(raw, tenant)
    document = (await raw.get("/openapi.json")).json()
    gets = [path for path, item in document["paths"].items() if "get" in item]
    assert {"/orders", "/orders/{order_id}", "/healthz", "/readyz", "/metrics"} <= set(gets)
    for path in gets:
        head = await raw.head(path.format(order_id=order_id), headers=auth(tenant))
        assert head.status_code == 200, path
        assert head.content == b""
