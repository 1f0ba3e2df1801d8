"""/openapi.json documents every endpoint, its schemas match the real bodies; /docs is offline."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import jsonschema_rs
import pytest

from orders_api.orders import schemas
from tests.api.support import assert_error, confirmed_order, create_order
from tests.helpers import PROJECT_ROOT, auth, free_port

ORDER_PATH = "/orders/{order_id}"
CONFIRM_PATH = "/orders/{order_id}/confirm"
CLOSE_PATH = "/orders/{order_id}/close"
# Every operation and the statuses it can answer (beyond 500, which any request can get).
OPERATIONS: dict[tuple[str, str], tuple[str, set[int]]] = {
    ("post", "/orders"): ("CreatedOrder", {200, 201, 400, 401, 409, 413, 415, 503}),
    ("get", "/orders"): ("OrderPage", {200, 400, 401, 503}),
    ("get", ORDER_PATH): ("Order", {200, 401, 404, 503}),
    ("patch", CONFIRM_PATH): ("ConfirmedOrder", {200, 400, 401, 404, 409, 413, 415, 428, 503}),
    ("post", CLOSE_PATH): ("ClosedOrder", {200, 400, 401, 404, 409, 413, 415, 503}),
}
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture
async def openapi(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    document: dict[str, Any] = response.json()
    return document


def closed(schema: Any) -> Any:
    """A copy in which every object schema with properties refuses undocumented fields."""
    if isinstance(schema, dict):
        result = {key: closed(value) for key, value in schema.items()}
        if "properties" in result and "additionalProperties" not in result:
            result["additionalProperties"] = False
        return result
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    return schema


def documented_schema(document: dict[str, Any], method: str, path: str, status: int) -> Any:
    responses = document["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} does not document {status}"
    return responses[str(status)]["content"]["application/json"]["schema"]


def validator(document: dict[str, Any], schema: Any) -> jsonschema_rs.Draft202012Validator:
    root = {**closed(schema), "components": closed(copy.deepcopy(document["components"]))}
    return jsonschema_rs.Draft202012Validator(root, validate_formats=True)


def assert_documented(
    document: dict[str, Any], method: str, path: str, response: httpx.Response
) -> None:
    """The real response's status is documented for the operation and its body fits the schema."""
    schema = documented_schema(document, method, path, response.status_code)
    errors = [error.message for error in validator(document, schema).iter_errors(response.json())]
    assert errors == [], (method, path, response.status_code, response.text)


def test_every_endpoint_is_documented(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    documented = {(method, path) for path, ops in paths.items() for method in ops}
    assert set(OPERATIONS) <= documented
    assert {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics")} <= documented
    for (method, path), (model, statuses) in OPERATIONS.items():
        responses = paths[path][method]["responses"]
        assert statuses <= {int(status) for status in responses}, (method, path)
        for status in statuses:
            schema = responses[str(status)]["content"]["application/json"]["schema"]
            expected = model if status < 300 else "ErrorBody"
            assert schema == {"$ref": f"#/components/schemas/{expected}"}, (method, path, status)


def test_components_are_the_schema_models(openapi: dict[str, Any]) -> None:
    components = openapi["components"]["schemas"]
    for model in (
        schemas.CreatedOrder,
        schemas.ConfirmedOrder,
        schemas.ClosedOrder,
        schemas.Order,
    ):
        assert set(components[model.__name__]["properties"]) == set(model.model_fields)
        assert set(components[model.__name__]["required"]) == set(model.model_fields)
    assert components["ErrorBody"]["required"] == ["code", "message"]
    assert set(components["ErrorBody"]["properties"]) == {"code", "message", "details"}


def test_inputs_are_documented_as_validated(openapi: dict[str, Any]) -> None:
    paths = openapi["paths"]
    confirm_body = paths[CONFIRM_PATH]["patch"]["requestBody"]
    assert confirm_body["required"] is True
    reference = confirm_body["content"]["application/json"]["schema"]
    assert reference == {"$ref": "#/components/schemas/ConfirmOrderRequest"}
    schema = openapi["components"]["schemas"]["ConfirmOrderRequest"]
    assert schema["required"] == ["totalCents"]
    assert schema["additionalProperties"] is False
    total = schema["properties"]["totalCents"]
    assert (total["type"], total["minimum"], total["maximum"]) == ("integer", 0, 2_147_483_647)
    create = {p["name"].lower(): p for p in paths["/orders"]["post"]["parameters"]}
    assert create["idempotency-key"]["in"] == "header"
    assert create["idempotency-key"]["required"] is True
    assert create["idempotency-key"]["schema"]["maxLength"] == 255
    listing = {p["name"]: p for p in paths["/orders"]["get"]["parameters"]}
    limit = listing["limit"]["schema"]
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 100, 10)
    assert "cursor" in listing
    # The tenant is a security scheme (the header, in the default mode) on every operation.
    scheme = openapi["components"]["securitySchemes"]["tenant"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "X-Tenant-Id")
    for method, path in OPERATIONS:
        assert paths[path][method]["security"] == [{"tenant": []}], (method, path)
    assert "if-match" in {p["name"].lower() for p in paths[CONFIRM_PATH]["patch"]["parameters"]}
    assert "if-match" in {p["name"].lower() for p in paths[CLOSE_PATH]["post"]["parameters"]}


async def test_real_success_responses_match_the_documented_schemas(
    client: httpx.AsyncClient, openapi: dict[str, Any], tenant: str
) -> None:
    headers = auth(tenant, Idempotency_Key="k-docs")
    created = await client.post("/orders", headers=headers)
    assert created.status_code == 201
    assert_documented(openapi, "post", "/orders", created)
    replay = await client.post("/orders", headers=headers)
    assert replay.status_code == 200
    assert_documented(openapi, "post", "/orders", replay)
    order_id = created.json()["id"]

    draft = await client.get(f"/orders/{order_id}", headers=auth(tenant))
    assert_documented(openapi, "get", ORDER_PATH, draft)
    confirm = await client.patch(
        f"/orders/{order_id}/confirm", headers=auth(tenant, If_Match='"1"'), json={"totalCents": 5}
    )
    assert confirm.status_code == 200
    assert_documented(openapi, "patch", CONFIRM_PATH, confirm)
    closed_order = await client.post(f"/orders/{order_id}/close", headers=auth(tenant))
    assert closed_order.status_code == 200
    assert_documented(openapi, "post", CLOSE_PATH, closed_order)
    final = await client.get(f"/orders/{order_id}", headers=auth(tenant))
    assert_documented(openapi, "get", ORDER_PATH, final)

    await create_order(client, tenant)
    first = await client.get("/orders", headers=auth(tenant), params={"limit": 1})
    assert first.json()["nextCursor"] is not None
    assert_documented(openapi, "get", "/orders", first)
    last = await client.get(
        "/orders", headers=auth(tenant), params={"limit": 1, "cursor": first.json()["nextCursor"]}
    )
    assert last.json()["nextCursor"] is None
    assert_documented(openapi, "get", "/orders", last)

    # The same bodies also parse as the response models the router declares.
    schemas.CreatedOrder.model_validate(created.json())
    schemas.ConfirmedOrder.model_validate(confirm.json())
    schemas.ClosedOrder.model_validate(closed_order.json())
    schemas.Order.model_validate(final.json())
    schemas.OrderPage.model_validate(first.json())


async def test_real_error_responses_match_the_documented_schemas(
    client: httpx.AsyncClient, openapi: dict[str, Any], tenant: str
) -> None:
    unknown = f"/orders/{uuid.uuid4()}"
    draft = await create_order(client, tenant)
    confirmed = await confirmed_order(client, tenant)
    reused_key = "k-reuse"
    assert (
        await client.post("/orders", headers=auth(tenant, Idempotency_Key=reused_key))
    ).status_code == 201
    cases: list[tuple[str, str, int, httpx.Response]] = [
        ("post", "/orders", 400, await client.post("/orders", headers=auth(tenant))),
        ("post", "/orders", 401, await client.post("/orders", headers={"Idempotency-Key": "k"})),
        (
            "post",
            "/orders",
            409,
            await client.post(
                "/orders", headers=auth(tenant, Idempotency_Key=reused_key), json={"x": 1}
            ),
        ),
        (
            "post",
            "/orders",
            415,
            await client.post(
                "/orders",
                headers=auth(tenant, Idempotency_Key="k-415", Content_Type="text/plain"),
                content=b"x",
            ),
        ),
        (
            "post",
            "/orders",
            413,
            await client.post(
                "/orders",
                headers=auth(tenant, Idempotency_Key="k-413"),
                content=b" " * (1024 * 1024 + 1),
            ),
        ),
        ("get", "/orders", 400, await client.get("/orders?cursor=bad", headers=auth(tenant))),
        ("get", "/orders", 400, await client.get("/orders?limit=0", headers=auth(tenant))),
        ("get", ORDER_PATH, 404, await client.get(unknown, headers=auth(tenant))),
        ("get", ORDER_PATH, 401, await client.get(unknown)),
        (
            "patch",
            CONFIRM_PATH,
            428,
            await client.patch(
                f"/orders/{draft['id']}/confirm", headers=auth(tenant), json={"totalCents": 1}
            ),
        ),
        (
            "patch",
            CONFIRM_PATH,
            409,
            await client.patch(
                f"/orders/{draft['id']}/confirm",
                headers=auth(tenant, If_Match='"4"'),
                json={"totalCents": 1},
            ),
        ),
        (
            "patch",
            CONFIRM_PATH,
            400,
            await client.patch(
                f"/orders/{draft['id']}/confirm",
                headers=auth(tenant, If_Match='"1"'),
                json={"totalCents": "1"},
            ),
        ),
        (
            "patch",
            CONFIRM_PATH,
            404,
            await client.patch(
                f"{unknown}/confirm", headers=auth(tenant, If_Match='"1"'), json={"totalCents": 1}
            ),
        ),
        (
            "post",
            CLOSE_PATH,
            409,
            await client.post(f"/orders/{draft['id']}/close", headers=auth(tenant)),
        ),
        (
            "post",
            CLOSE_PATH,
            409,
            await client.post(
                f"/orders/{confirmed['id']}/close", headers=auth(tenant, If_Match='"1"')
            ),
        ),
        ("post", CLOSE_PATH, 404, await client.post(f"{unknown}/close", headers=auth(tenant))),
    ]
    for method, path, status, response in cases:
        assert_error(response, status, response.json()["code"])
        assert_documented(openapi, method, path, response)


def test_the_schema_check_can_fail(openapi: dict[str, Any]) -> None:
    """The validator used above refuses wrong bodies (so the tests above can fail)."""
    order = validator(openapi, {"$ref": "#/components/schemas/Order"})
    good = {
        "id": str(uuid.uuid4()),
        "tenantId": "t",
        "status": "draft",
        "version": 1,
        "totalCents": None,
        "createdAt": "2026-01-01T00:00:00.000001Z",
        "updatedAt": "2026-01-01T00:00:00.000001Z",
    }
    assert order.is_valid(good)
    for wrong in (
        {**good, "status": "open"},
        {**good, "extra": 1},
        {**good, "version": "1"},
        {**good, "createdAt": "yesterday"},
        {key: value for key, value in good.items() if key != "updatedAt"},
    ):
        assert not order.is_valid(wrong), wrong
    error = validator(openapi, {"$ref": "#/components/schemas/ErrorBody"})
    assert error.is_valid({"code": "x", "message": "y"})
    assert not error.is_valid({"code": "x", "message": "y", "trace": "..."})


class _AssetLinks(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in {"src", "href"} and value:
                self.urls.append(value)


async def test_docs_reference_only_local_assets_that_are_served(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text
    assert "https://" not in page.text
    assert "//cdn" not in page.text
    links = _AssetLinks()
    links.feed(page.text)
    assert any(url.endswith(".js") for url in links.urls)
    assert any(url.endswith(".css") for url in links.urls)
    for url in links.urls:
        parts = urlsplit(url)
        assert not parts.scheme
        assert not parts.netloc
        asset = await client.get(urljoin("/docs", url))
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "url: '/openapi.json'" in page.text
    bundle = next(url for url in links.urls if url.endswith("swagger-ui-bundle.js"))
    script = await client.get(urljoin("/docs", bundle))
    assert "javascript" in script.headers["content-type"]
    assert "SwaggerUIBundle" in script.text


@pytest.fixture
def docs_server(database_url: str, tmp_path: Path) -> Iterator[str]:
    """A real uvicorn process serving the app on the session's database."""
    port = free_port()
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "orders_api.app:create_app_from_env",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = (tmp_path / "server.log").open("wb")
    process = subprocess.Popen(
        command,
        env=env,
        cwd=PROJECT_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/healthz", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.1)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.browser
def test_swagger_ui_renders_in_headless_chromium_offline(docs_server: str, tmp_path: Path) -> None:
    chromium = shutil.which("chromium") or CHROMIUM
    assert Path(chromium).exists(), "chromium is missing: install it (.ci/ensure-tools)"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium'}",
        # No internet: every host but the local server fails to resolve, so a CDN asset
        # could not load and Swagger UI would not render.
        "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
        "--virtual-time-budget=15000",
        "--dump-dom",
        f"{docs_server}/docs",
    ]
    result = subprocess.run(command, capture_output=True, timeout=60, check=False)
    dom = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert 'id="swagger-ui"' in dom
    assert "swagger-ui" in dom
    assert "orders-api" in dom
    for path in ("/orders", "/orders/{order_id}", CONFIRM_PATH, CLOSE_PATH, "/healthz"):
        assert f'data-path="{path}"' in dom, path
    for method in ("get", "post", "patch"):
        assert f"opblock opblock-{method}" in dom, method
