"""HTTP adapter for orders: headers and body in, JSON and headers out. No SQL here.

The handlers take only the Request (FastAPI's per-request parameter resolution would cost
more than the rest of a read) and find the service in the lifespan state; the parameters they
read are declared once, as `Parameter`s, which also document them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.responses import Response

from orders_api import idempotency
from orders_api.errors import (
    Conflict,
    ErrorBody,
    NotFound,
    PreconditionRequired,
    validation_failed,
)
from orders_api.observability import IDEMPOTENCY
from orders_api.orders.schemas import (
    ClosedOrder,
    CloseOrderRequest,
    ConfirmedOrder,
    ConfirmOrderRequest,
    CreatedOrder,
    CreateOrderRequest,
    Order,
    OrderPage,
    OrderStatus,
)
from orders_api.orders.service import Encoded, OrderService, key_reused
from orders_api.orders.store import KeyUse
from orders_api.tenancy import TENANT_SECURITY, tenant_of
from orders_api.web import (
    Parameter,
    check_parameters,
    encoded_response,
    read_json,
    validate_body,
)

router = APIRouter(prefix="/orders", tags=["orders"])

MAX_VERSION = 2_147_483_647
# RFC 9110 entity-tags, strong or weak, plus a bare number (proxies and hand-written clients
# drop the quotes); a tag that names no version (`"0"`, `"abc"`) is well-formed and simply
# never matches.
_ENTITY_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"|[0-9]+'
_TAG_VERSION = re.compile(r'(?:W/)?"([^"]*)"|([0-9]+)')
_VERSION = re.compile(r"[1-9][0-9]{0,9}")

_KEY = Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
IDEMPOTENCY_KEY = Parameter(
    "header",
    "Idempotency-Key",
    _KEY,
    description="1-255 visible ASCII characters, taken verbatim",
    required=True,
)
CHANGE_IDEMPOTENCY_KEY = Parameter(
    "header",
    "Idempotency-Key",
    _KEY,
    description="optional: a retry with the same key and request replays the stored response",
)
_TAG_LIST = Field(
    max_length=1024,
    pattern=rf"^[ \t]*(?:\*|(?:{_ENTITY_TAG})(?:[ \t]*,[ \t]*(?:{_ENTITY_TAG}))*)[ \t]*$",
)
IF_MATCH = Parameter(
    "header", "If-Match", _TAG_LIST, description='`"3"`, `3`, `W/"3"`, a list, or `*`'
)
IF_NONE_MATCH = Parameter(
    "header",
    "If-None-Match",
    _TAG_LIST,
    description="the ETag you hold: 304 without a body while it is current",
)
STATUS = Parameter(
    "query", "status", Field(), python_type=OrderStatus, description="only orders in this status"
)
LIMIT = Parameter("query", "limit", Field(ge=1, le=100, default=10), python_type=int)
CURSOR = Parameter(
    "query",
    "cursor",
    Field(max_length=256, pattern="^[A-Za-z0-9_-]+$"),
    description="opaque: the nextCursor of the previous page",
)
# confirm answers 428 without If-Match, after the body checks: so the handler checks presence
# itself and the document declares the header required.
REQUIRED_IF_MATCH_DOC = {
    **IF_MATCH.doc,
    "required": True,
    "description": IF_MATCH.doc["description"] + "; without it: 428",
}
ORDER_ID_PARAMETER = {
    "name": "order_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "title": "Order Id"},
}


def parse_if_match(value: str) -> frozenset[int] | None:
    """A checked If-Match (or If-None-Match) value: `*` -> None (any version), else the
    versions it names.

    Weak and bare tags count although RFC 9110 asks for strong comparison, because proxies
    weaken ETags.
    """
    if value.strip(" \t") == "*":
        return None
    versions = set()
    for quoted, bare in _TAG_VERSION.findall(value):
        tag = quoted or bare
        if _VERSION.fullmatch(tag) and int(tag) <= MAX_VERSION:
            versions.add(int(tag))
    return frozenset(versions)


def orders_of(request: Request) -> OrderService:
    """The service the lifespan built."""
    service: OrderService = request.scope["state"]["orders"]
    return service


def order_id_of(request: Request) -> uuid.UUID:
    """A malformed id names no order: 404, like an unknown one."""
    try:
        return uuid.UUID(request.path_params["order_id"])
    except ValueError:
        raise NotFound("order not found") from None


_ERROR_DESCRIPTIONS = {
    400: "`validation_error`: malformed headers, query, JSON or body",
    401: "`unauthorized`: no valid tenant",
    404: "`not_found`: no such order for this tenant",
    409: "`conflict`: `details.reason` says which",
    413: "`payload_too_large`: the body is over the limit",
    415: "`unsupported_media_type`: a body that is not JSON",
    428: "`precondition_required`: If-Match is missing",
    503: "`unavailable`: the database cannot be reached",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The error answers of an orders operation: `codes`, plus the 401 and the 503 (database
    outage) that every one of them can give."""
    return {
        code: {"model": ErrorBody, "description": _ERROR_DESCRIPTIONS[code]}
        for code in sorted({*codes, 401, 503})
    }


# The request bodies by name; /openapi.json lists them under components (orders_api.openapi),
# so that generated clients name their types after them.
REQUEST_BODIES: dict[str, type[BaseModel]] = {}


def _json_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    REQUEST_BODIES[model.__name__] = model
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": schema}}
    return {"requestBody": {"required": required, "content": content}}


# The headers of the success answers, as the handlers send them.
_ETAG = {
    "description": 'The order\'s version as an entity-tag (`"3"`): the If-Match of its next change',
    "required": True,
    "schema": {"type": "string", "pattern": '^"[1-9][0-9]*"$'},
}
_LOCATION = {
    "description": "The order's URL, `/orders/{id}`",
    "required": True,
    "schema": {"type": "string", "format": "uri-reference"},
}
_REPLAYED = {
    "description": "`true`: this is the stored answer to an earlier request with the same key",
    "required": True,
    "schema": {"type": "string", "enum": ["true"]},
}
_CHANGE_HEADERS = {
    "ETag": _ETAG,
    "Idempotent-Replayed": {
        **_REPLAYED,
        "required": False,
        "description": "Sent (`true`) on a replay only: the stored answer to an earlier request "
        "with the same Idempotency-Key",
    },
}
_REPLAY_NOTE = (
    "; with an Idempotency-Key already used for the same request, the stored answer, with "
    "`Idempotent-Replayed: true`"
)


# OpenAPI links, so that clients (and schemathesis' stateful phase) can follow one order
# through its life: the id from the body and the version from the ETag (the tenant is the
# security scheme's, the same on every call).
_ORDER_LINKS: dict[str, Any] = {
    "GetOrder": {
        "operationId": "getOrder",
        "parameters": {"path.order_id": "$response.body#/id"},
    },
}
_CREATED_LINKS: dict[str, Any] = {
    **_ORDER_LINKS,
    "ConfirmOrder": {
        "operationId": "confirmOrder",
        "parameters": {
            "path.order_id": "$response.body#/id",
            "header.If-Match": "$response.header.ETag",
        },
    },
}
_CONFIRMED_LINKS: dict[str, Any] = {
    **_ORDER_LINKS,
    "CloseOrder": {
        "operationId": "closeOrder",
        "parameters": {
            "path.order_id": "$response.body#/id",
            "header.If-Match": "$response.header.ETag",
        },
    },
}
_PAGE_LINKS: dict[str, Any] = {
    "NextPage": {
        "operationId": "listOrders",
        "parameters": {
            "query.cursor": "$response.body#/nextCursor",
            "query.status": "$request.query.status",
        },
    },
}


@router.post(
    "",
    status_code=201,
    response_model=CreatedOrder,
    operation_id="createOrder",
    responses={
        201: {
            "description": "The new draft order",
            "headers": {"Location": _LOCATION, "ETag": _ETAG},
            "links": _CREATED_LINKS,
        },
        200: {
            "model": CreatedOrder,
            "description": "A replay: the original answer to the same key and body",
            "headers": {"Location": _LOCATION, "ETag": _ETAG, "Idempotent-Replayed": _REPLAYED},
            "links": _CREATED_LINKS,
        },
        **_errors(400, 409, 413, 415),
    },
    openapi_extra={
        **_json_body(CreateOrderRequest, required=False),
        "parameters": [IDEMPOTENCY_KEY.doc],
        "security": TENANT_SECURITY,
    },
)
async def create_order(request: Request) -> Response:
    """Create a draft order. A retry with the same Idempotency-Key and body, within the replay
    window, answers 200 with the original response; the key with another body answers 409."""
    tenant = tenant_of(request)
    errors: list[dict[str, Any]] = []
    key: str = IDEMPOTENCY_KEY.of(request, errors)
    check_parameters(errors)
    orders = orders_of(request)
    data = await read_json(request)
    request_hash = idempotency.fingerprint(data)
    try:
        CreateOrderRequest.model_validate(data)
    except ValidationError as exc:
        if await orders.key_in_use(tenant, key, request_hash):
            IDEMPOTENCY["create", "conflict"].inc()
            raise key_reused() from None
        raise validation_failed(exc.errors(include_input=False), "invalid request body") from None
    try:
        result = await orders.create(tenant, key, request_hash)
    except Conflict as exc:
        if (exc.details or {}).get("reason") == "idempotency_key_reused":
            IDEMPOTENCY["create", "conflict"].inc()
        raise
    IDEMPOTENCY["create", "replayed" if result.replayed else "created"].inc()
    headers = {"location": f"/orders/{result.order_id}", "etag": '"1"'}
    if result.replayed:
        headers["idempotent-replayed"] = "true"
    return encoded_response(result.body, 200 if result.replayed else 201, **headers)


@router.get(
    "",
    response_model=OrderPage,
    operation_id="listOrders",
    responses={200: {"description": "A page of orders", "links": _PAGE_LINKS}, **_errors(400)},
    openapi_extra={
        "parameters": [LIMIT.doc, CURSOR.doc, STATUS.doc],
        "security": TENANT_SECURITY,
    },
)
async def list_orders(request: Request) -> Response:
    """The tenant's orders, newest first, a page at a time: send `nextCursor` back as
    `cursor` for the next page (it is null on the last). A cursor only works with the `status`
    filter it was made with."""
    tenant = tenant_of(request)
    errors: list[dict[str, Any]] = []
    limit: int = LIMIT.of(request, errors)
    cursor: str | None = CURSOR.of(request, errors)
    status: str | None = STATUS.of(request, errors)
    check_parameters(errors)
    page = await orders_of(request).list_page(tenant, limit, cursor, status)
    return encoded_response(page)


@router.get(
    "/{order_id}",
    response_model=Order,
    operation_id="getOrder",
    responses={
        200: {"description": "The order", "headers": {"ETag": _ETAG}},
        304: {
            "description": "Not Modified: If-None-Match names the current version (no body)",
            "headers": {"ETag": _ETAG},
        },
        **_errors(400, 404),
    },
    openapi_extra={
        "parameters": [ORDER_ID_PARAMETER, IF_NONE_MATCH.doc],
        "security": TENANT_SECURITY,
    },
)
async def get_order(request: Request) -> Response:
    """One order of the tenant, its version as ETag. If-None-Match naming the current
    version answers 304 without a body."""
    tenant = tenant_of(request)
    errors: list[dict[str, Any]] = []
    if_none_match: str | None = IF_NONE_MATCH.of(request, errors)
    check_parameters(errors)
    result = await orders_of(request).get(tenant, order_id_of(request))
    etag = f'"{result.version}"'
    if if_none_match is not None:
        held = parse_if_match(if_none_match)
        if held is None or result.version in held:  # weak comparison, as RFC 9110 asks
            return Response(status_code=304, headers={"etag": etag})
    return encoded_response(result.body, etag=etag)


def _change_parameters(request: Request) -> tuple[str | None, frozenset[int] | None, str | None]:
    """If-Match as sent (None: absent), the versions it accepts (None: any), and the
    Idempotency-Key of a confirm or close (None: absent)."""
    errors: list[dict[str, Any]] = []
    if_match: str | None = IF_MATCH.of(request, errors)
    key: str | None = CHANGE_IDEMPOTENCY_KEY.of(request, errors)
    check_parameters(errors)
    return if_match, None if if_match is None else parse_if_match(if_match), key


async def _changed(
    operation: str,
    key: str | None,
    change: Callable[[KeyUse | None], Awaitable[Encoded]],
    fingerprint: Callable[[], str],
) -> Response:
    """Run a confirm or close, with its key when one was sent; the response with its ETag."""
    use = None if key is None else KeyUse(key, fingerprint())
    try:
        result = await change(use)
    except Conflict as exc:
        if use is not None and (exc.details or {}).get("reason") == "idempotency_key_reused":
            IDEMPOTENCY[operation, "conflict"].inc()
        raise
    headers = {"etag": f'"{result.version}"'}
    if use is not None:
        IDEMPOTENCY[operation, "replayed" if result.replayed else "created"].inc()
    if result.replayed:
        headers["idempotent-replayed"] = "true"
    return encoded_response(result.body, 200, **headers)


@router.patch(
    "/{order_id}/confirm",
    response_model=ConfirmedOrder,
    operation_id="confirmOrder",
    responses={
        200: {
            "description": "The confirmed order" + _REPLAY_NOTE,
            "headers": _CHANGE_HEADERS,
            "links": _CONFIRMED_LINKS,
        },
        **_errors(400, 404, 409, 413, 415, 428),
    },
    openapi_extra={
        **_json_body(ConfirmOrderRequest, required=True),
        "parameters": [ORDER_ID_PARAMETER, REQUIRED_IF_MATCH_DOC, CHANGE_IDEMPOTENCY_KEY.doc],
        "security": TENANT_SECURITY,
    },
)
async def confirm_order(request: Request) -> Response:
    """Confirm a draft and set its total. If-Match must name the current version (a stale
    one answers 409 `stale_version`); with an Idempotency-Key, a retry replays the answer."""
    tenant = tenant_of(request)
    if_match, expected, key = _change_parameters(request)
    body = validate_body(ConfirmOrderRequest, await read_json(request))
    if if_match is None:
        raise PreconditionRequired("If-Match is required: send the ETag you read")
    order_id = order_id_of(request)
    orders = orders_of(request)
    return await _changed(
        "confirm",
        key,
        lambda use: orders.confirm(tenant, order_id, expected, body.totalCents, use),
        lambda: idempotency.change_fingerprint("confirm", order_id, expected, body.model_dump()),
    )


@router.post(
    "/{order_id}/close",
    response_model=ClosedOrder,
    operation_id="closeOrder",
    responses={
        200: {
            "description": "The closed order" + _REPLAY_NOTE,
            "headers": _CHANGE_HEADERS,
            "links": _ORDER_LINKS,
        },
        **_errors(400, 404, 409, 413, 415),
    },
    openapi_extra={
        **_json_body(CloseOrderRequest, required=False),
        "parameters": [ORDER_ID_PARAMETER, IF_MATCH.doc, CHANGE_IDEMPOTENCY_KEY.doc],
        "security": TENANT_SECURITY,
    },
)
async def close_order(request: Request) -> Response:
    """Close a confirmed order and record its `orders.closed` event in the same transaction.
    If-Match, when sent, must name the current version; with an Idempotency-Key, a retry
    replays the answer."""
    tenant = tenant_of(request)
    _, expected, key = _change_parameters(request)
    body = validate_body(CloseOrderRequest, await read_json(request))
    order_id = order_id_of(request)
    orders = orders_of(request)
    return await _changed(
        "close",
        key,
        lambda use: orders.close(tenant, order_id, expected, use),
        lambda: idempotency.change_fingerprint("close", order_id, expected, body.model_dump()),
    )
