"""HTTP adapter for orders: headers and body in, JSON and headers out. No SQL here."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from orders_api import idempotency
from orders_api.errors import (
    Conflict,
    ErrorBody,
    NotFound,
    PreconditionRequired,
    UnsupportedMediaType,
    ValidationFailed,
    validation_failed,
)
from orders_api.observability import IDEMPOTENCY
from orders_api.orders import service
from orders_api.orders.schemas import (
    ClosedOrder,
    ConfirmedOrder,
    ConfirmOrderRequest,
    CreatedOrder,
    EmptyRequest,
    Order,
    OrderPage,
)
from orders_api.pagination import InvalidCursor, cursor_secret, decode_cursor
from orders_api.tenancy import TENANT_PARAMETER, tenant_of

router = APIRouter(prefix="/orders", tags=["orders"])
ModelT = TypeVar("ModelT", bound=BaseModel)

_ETAG = re.compile(r'(?:W/)?"([1-9]\d{0,9})"|([1-9]\d{0,9})')
MAX_VERSION = 2_147_483_647
# The same grammar for the OpenAPI document: a version is 1..2147483647 without leading zeros.
_VERSION_PATTERN = (
    r"(?:[1-9][0-9]{0,8}|1[0-9]{9}|20[0-9]{8}|21[0-3][0-9]{7}|214[0-6][0-9]{6}"
    r"|2147[0-3][0-9]{5}|21474[0-7][0-9]{4}|214748[0-2][0-9]{3}|2147483[0-5][0-9]{2}"
    r"|21474836[0-3][0-9]|214748364[0-7])"
)
_TAG_PATTERN = rf'(?:(?:W/)?"{_VERSION_PATTERN}"|{_VERSION_PATTERN})'
IF_MATCH_PATTERN = rf"^[ \t]*(?:\*|{_TAG_PATTERN}(?:[ \t]*,[ \t]*{_TAG_PATTERN})*)[ \t]*$"


def parse_if_match(value: str) -> frozenset[int] | None:
    """`*` -> None (any version); `"3"`, `3`, `W/"3"` or a comma list -> the versions named.

    Weak and bare tags are accepted although RFC 9110 asks for strong comparison, because
    proxies weaken ETags; anything else is a 400.
    """
    value = value.strip(" \t")
    if value == "*":
        return None
    versions: set[int] = set()
    for part in value.split(","):
        match = _ETAG.fullmatch(part.strip(" \t"))
        if match is None:
            raise ValidationFailed('If-Match must be *, a version or a list of ETags like "3"')
        version = int(match.group(1) or match.group(2))
        if not 1 <= version <= MAX_VERSION:
            raise ValidationFailed("If-Match names a version out of range")
        versions.add(version)
    return frozenset(versions)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


async def read_body(request: Request) -> bytes:
    """The request body, read straight off the ASGI channel (Starlette's body() goes through
    an async generator: several times the cost, on every write)."""
    chunks = []
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json(request: Request) -> Any:
    """The parsed body; empty or whitespace-only counts as `{}`."""
    body = await read_body(request)
    if not body.strip():
        return {}
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise UnsupportedMediaType("the body must be application/json")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ValidationFailed("malformed JSON body") from None


def validate_body(model: type[ModelT], data: Any) -> ModelT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_failed(exc.errors(include_input=False), "invalid request body") from None


def parse_order_id(value: str) -> uuid.UUID:
    """A malformed id names no order: 404, like an unknown one."""
    try:
        return uuid.UUID(value)
    except ValueError:
        raise NotFound("order not found") from None


class EncodedJSON(Response):
    """A body that arrives encoded as JSON (by the database or once by the service), with
    its headers written straight as ASGI raw headers: lowercase names, no checks needed."""

    def init_headers(self, headers: Mapping[str, str] | None = None) -> None:
        raw = [(b"content-length", b"%d" % len(self.body)), (b"content-type", b"application/json")]
        if headers:
            raw.extend(
                (name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
            )
        self.raw_headers = raw


def encoded_response(body: bytes, status_code: int = 200, **headers: str) -> Response:
    """`headers` by their lowercase names."""
    return EncodedJSON(body, status_code, headers)


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody} for code in (*codes, 401, 503)}


def _json_body(model: type[BaseModel], *, required: bool) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


class Parameter:
    """A header or query parameter read straight from the request, validated as FastAPI would.

    FastAPI's per-request parameter and dependency resolution costs more than the rest of a
    read, so the handlers read their headers and query parameters themselves: a cheap check
    accepts the usual values and anything else goes through pydantic with the constraints
    FastAPI applied, for the same 400 details. `doc` is what /openapi.json says about it.
    """

    def __init__(
        self,
        where: str,
        name: str,
        annotation: Any,
        doc: dict[str, Any],
        *,
        required: bool = False,
        accept: Callable[[str], Any] | None = None,
    ) -> None:
        self.where = where
        self.name = name
        self.required = required
        self.adapter: TypeAdapter[Any] = TypeAdapter(annotation)
        self.accept = accept
        self.doc = {"name": name, "in": where, "required": required, **doc}

    def check(self, value: str | None, errors: list[dict[str, Any]]) -> Any:
        """The valid value (None when absent and optional), else its errors are appended."""
        if value is None:
            if self.required:
                errors.append(
                    {"loc": (self.where, self.name), "msg": "Field required", "type": "missing"}
                )
            return None
        if self.accept is not None:
            accepted = self.accept(value)
            if accepted is not None:
                return accepted
        try:
            return self.adapter.validate_python(value)
        except ValidationError as exc:
            for error in exc.errors(include_input=False):
                errors.append({**error, "loc": (self.where, self.name, *error["loc"])})
            return None


def check_parameters(errors: list[dict[str, Any]]) -> None:
    """400 with every parameter error at once, as FastAPI answered."""
    if errors:
        raise validation_failed(errors)


_KEY_DOC = "1-255 visible ASCII characters, taken verbatim"
IDEMPOTENCY_KEY = Parameter(
    "header",
    "Idempotency-Key",
    Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")],
    {
        "description": _KEY_DOC,
        "schema": {
            "type": "string",
            "title": "Idempotency-Key",
            "description": _KEY_DOC,
            "minLength": 1,
            "maxLength": 255,
            "pattern": r"^[\x21-\x7e]+$",
        },
    },
    required=True,
    accept=lambda value: value if idempotency.KEY_PATTERN.fullmatch(value) else None,
)
_IF_MATCH_DOC = '`"3"`, `3`, `W/"3"`, a list, or `*`'
_IF_MATCH_MAX = 1024


def _short_if_match(value: str) -> str | None:
    return value if len(value) <= _IF_MATCH_MAX else None


IF_MATCH = Parameter(
    "header",
    "If-Match",
    Annotated[str, Field(max_length=_IF_MATCH_MAX)],
    {
        "description": _IF_MATCH_DOC,
        "schema": {
            "type": "string",
            "title": "If-Match",
            "description": _IF_MATCH_DOC,
            "maxLength": _IF_MATCH_MAX,
            "pattern": IF_MATCH_PATTERN,
        },
    },
    accept=_short_if_match,
)
# confirm answers 428 without If-Match, after the body checks: so the handler checks presence
# itself and the document declares the header required.
_REQUIRED_IF_MATCH_DOC = {
    "name": "If-Match",
    "in": "header",
    "required": True,
    "description": _IF_MATCH_DOC + "; without it: 428",
    "schema": {"type": "string", "maxLength": _IF_MATCH_MAX, "pattern": IF_MATCH_PATTERN},
}
_LIMITS = {str(n): n for n in range(1, 101)}
LIMIT = Parameter(
    "query",
    "limit",
    Annotated[int, Field(ge=1, le=100)],
    {
        "schema": {
            "type": "integer",
            "title": "Limit",
            "minimum": 1,
            "maximum": 100,
            "default": 10,
        }
    },
    accept=_LIMITS.get,
)
CURSOR_PATTERN = "^[A-Za-z0-9_-]{54}$"  # base64url of 40 bytes, unpadded
_CURSOR_DOC = "opaque: the nextCursor of the previous page"
_CURSOR_MAX = 256


def _short_cursor(value: str) -> str | None:
    return value if len(value) <= _CURSOR_MAX else None


CURSOR = Parameter(
    "query",
    "cursor",
    Annotated[str, Field(max_length=_CURSOR_MAX)],
    {
        "description": _CURSOR_DOC,
        "schema": {
            "type": "string",
            "title": "Cursor",
            "description": _CURSOR_DOC,
            "maxLength": _CURSOR_MAX,
            "pattern": CURSOR_PATTERN,
        },
    },
    accept=_short_cursor,
)
ORDER_ID_PARAMETER = {
    "name": "order_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "title": "Order Id"},
}


def order_id_of(request: Request) -> uuid.UUID:
    return parse_order_id(request.path_params["order_id"])


# OpenAPI links, so that clients (and schemathesis' stateful phase) can follow one order
# through its life: the same tenant, the id from the body and the version from the ETag.
_SAME_TENANT = {"header.X-Tenant-Id": "$request.header.X-Tenant-Id"}
_ORDER_LINKS: dict[str, Any] = {
    "GetOrder": {
        "operationId": "getOrder",
        "parameters": {"path.order_id": "$response.body#/id", **_SAME_TENANT},
    },
}
_CREATED_LINKS: dict[str, Any] = {
    **_ORDER_LINKS,
    "ConfirmOrder": {
        "operationId": "confirmOrder",
        "parameters": {
            "path.order_id": "$response.body#/id",
            "header.If-Match": "$response.header.ETag",
            **_SAME_TENANT,
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
            **_SAME_TENANT,
        },
    },
}
_PAGE_LINKS: dict[str, Any] = {
    "NextPage": {
        "operationId": "listOrders",
        "parameters": {
            "query.cursor": "$response.body#/nextCursor",
            **_SAME_TENANT,
        },
    },
}


@router.post(
    "",
    status_code=201,
    response_model=CreatedOrder,
    operation_id="createOrder",
    responses={
        201: {"links": _CREATED_LINKS},
        200: {
            "model": CreatedOrder,
            "description": "Replay of the original response",
            "links": _CREATED_LINKS,
        },
        **_errors(400, 409, 413, 415),
    },
    openapi_extra={
        **_json_body(EmptyRequest, required=False),
        "parameters": [IDEMPOTENCY_KEY.doc, TENANT_PARAMETER],
    },
)
async def create_order(request: Request) -> Response:
    tenant = tenant_of(request)
    errors: list[dict[str, Any]] = []
    key: str = IDEMPOTENCY_KEY.check(request.headers.get("idempotency-key"), errors)
    check_parameters(errors)
    state = request.app.state
    data = await read_json(request)
    request_hash = idempotency.fingerprint(data)
    now = state.clock()
    window = state.idempotency_window
    try:
        EmptyRequest.model_validate(data)
    except ValidationError as exc:
        if await service.key_in_use(state.backend, tenant, key, request_hash, now, window):
            IDEMPOTENCY["conflict"].inc()
            raise service.key_reused() from None
        raise validation_failed(exc.errors(include_input=False), "invalid request body") from None
    try:
        result = await service.create_order(state.backend, tenant, key, request_hash, now, window)
    except Conflict as exc:
        if (exc.details or {}).get("reason") == "idempotency_key_reused":
            IDEMPOTENCY["conflict"].inc()
        raise
    IDEMPOTENCY["replayed" if result.replayed else "created"].inc()
    headers = {"location": f"/orders/{result.order_id}", "etag": '"1"'}
    if result.replayed:
        headers["idempotent-replayed"] = "true"
    return encoded_response(result.body, 200 if result.replayed else 201, **headers)


def _if_match(request: Request) -> str | None:
    errors: list[dict[str, Any]] = []
    value: str | None = IF_MATCH.check(request.headers.get("if-match"), errors)
    check_parameters(errors)
    return value


@router.patch(
    "/{order_id}/confirm",
    response_model=ConfirmedOrder,
    operation_id="confirmOrder",
    responses={200: {"links": _CONFIRMED_LINKS}, **_errors(400, 404, 409, 413, 415, 428)},
    openapi_extra={
        **_json_body(ConfirmOrderRequest, required=True),
        "parameters": [ORDER_ID_PARAMETER, TENANT_PARAMETER, _REQUIRED_IF_MATCH_DOC],
    },
)
async def confirm_order(request: Request) -> Response:
    tenant = tenant_of(request)
    if_match = _if_match(request)
    expected = parse_if_match(if_match) if if_match is not None else None
    body = validate_body(ConfirmOrderRequest, await read_json(request))
    if if_match is None:
        raise PreconditionRequired("If-Match is required: send the ETag you read")
    state = request.app.state
    result = await service.confirm_order(
        state.backend, tenant, order_id_of(request), expected, body.totalCents, state.clock()
    )
    return encoded_response(result.body, etag=f'"{result.version}"')


@router.post(
    "/{order_id}/close",
    response_model=ClosedOrder,
    operation_id="closeOrder",
    responses={200: {"links": _ORDER_LINKS}, **_errors(400, 404, 409, 413, 415)},
    openapi_extra={
        **_json_body(EmptyRequest, required=False),
        "parameters": [ORDER_ID_PARAMETER, IF_MATCH.doc, TENANT_PARAMETER],
    },
)
async def close_order(request: Request) -> Response:
    tenant = tenant_of(request)
    if_match = _if_match(request)
    expected = parse_if_match(if_match) if if_match is not None else None
    validate_body(EmptyRequest, await read_json(request))
    state = request.app.state
    result = await service.close_order(
        state.backend, tenant, order_id_of(request), expected, state.clock()
    )
    return encoded_response(result.body, etag=f'"{result.version}"')


@router.get(
    "/{order_id}",
    response_model=Order,
    operation_id="getOrder",
    responses=_errors(404),
    openapi_extra={"parameters": [ORDER_ID_PARAMETER, TENANT_PARAMETER]},
)
async def get_order(request: Request) -> Response:
    tenant = tenant_of(request)
    result = await service.get_order(request.app.state.backend, tenant, order_id_of(request))
    return encoded_response(result.body, etag=f'"{result.version}"')


@router.get(
    "",
    response_model=OrderPage,
    operation_id="listOrders",
    responses={200: {"links": _PAGE_LINKS}, **_errors(400)},
    openapi_extra={"parameters": [LIMIT.doc, CURSOR.doc, TENANT_PARAMETER]},
)
async def list_orders(request: Request) -> Response:
    tenant = tenant_of(request)
    query = request.query_params
    errors: list[dict[str, Any]] = []
    limit = LIMIT.check(query.get("limit"), errors)
    cursor: str | None = CURSOR.check(query.get("cursor"), errors)
    check_parameters(errors)
    state = request.app.state
    secret = await cursor_secret(state)
    after = None
    if cursor is not None:
        try:
            after = decode_cursor(secret, tenant, cursor)
        except InvalidCursor as exc:
            raise ValidationFailed(str(exc)) from None
    page = await service.list_orders(
        state.backend, tenant, 10 if limit is None else limit, after, secret
    )
    return encoded_response(page)
