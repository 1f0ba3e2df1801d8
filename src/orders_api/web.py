"""HTTP plumbing of the handlers: body reading, JSON responses, header and query parameters."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Annotated, Any, TypeVar, cast

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from orders_api.errors import UnsupportedMediaType, ValidationFailed, validation_failed

ModelT = TypeVar("ModelT", bound=BaseModel)


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


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


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


class Parameter:
    """A header or query parameter, declared once: its constraints (a pydantic field) give the
    OpenAPI entry, the validation and the cheap check of the usual values.

    FastAPI's per-request parameter resolution costs more than the rest of a read, so the
    handlers read their parameters themselves: `check` accepts a value the constraints
    plainly allow at the cost of a regex or a dict lookup, and sends anything else through
    pydantic with the same constraints, for the same 400 details FastAPI would give.
    """

    def __init__(
        self,
        where: str,
        name: str,
        field: Any,
        *,
        python_type: Any = str,
        description: str = "",
        required: bool = False,
    ) -> None:
        self.where = where
        self.name = name
        self.header = name.lower()
        self.required = required
        self.adapter: TypeAdapter[Any] = TypeAdapter(cast(Any, Annotated)[python_type, field])
        schema = self.adapter.json_schema()
        if description:
            schema["description"] = description
        self.doc: dict[str, Any] = {
            "name": name,
            "in": where,
            "required": required,
            "schema": schema,
        }
        if description:
            self.doc["description"] = description
        self.default = schema.get("default")
        self._fast = _fast_check(python_type, schema)

    def check(self, value: str | None, errors: list[dict[str, Any]]) -> Any:
        """The valid value (the default when absent and optional), else its errors are
        appended."""
        if value is None:
            if self.required:
                errors.append(
                    {"loc": (self.where, self.name), "msg": "Field required", "type": "missing"}
                )
            return self.default
        accepted = self._fast(value)
        if accepted is not None:
            return accepted
        try:
            return self.adapter.validate_python(value)
        except ValidationError as exc:
            for error in exc.errors(include_input=False):
                errors.append({**error, "loc": (self.where, self.name, *error["loc"])})
            return None

    def of(self, request: Request, errors: list[dict[str, Any]]) -> Any:
        """The parameter's value in `request`, checked. A header sent on several lines is one
        comma-separated list (RFC 9110 5.3); a query parameter may be given once."""
        if self.where == "header":
            lines = request.headers.getlist(self.header)
            return self.check(", ".join(lines) if lines else None, errors)
        values = request.query_params.getlist(self.name)
        if len(values) > 1:
            errors.append(
                {"loc": ("query", self.name), "msg": "given more than once", "type": "repeated"}
            )
            return None
        return self.check(values[0] if values else None, errors)


def _fast_check(python_type: Any, schema: dict[str, Any]) -> Callable[[str], Any]:
    """The common case, decided from the same JSON schema the document shows; None: ask
    pydantic."""
    if "enum" in schema:
        return {member: member for member in schema["enum"]}.get
    if python_type is int:
        low, high = schema.get("minimum"), schema.get("maximum")
        table = {str(n): n for n in range(low, high + 1)} if low is not None and high else {}
        return table.get
    if python_type is not str:
        return lambda _value: None
    pattern = re.compile(schema["pattern"]) if "pattern" in schema else None
    shortest, longest = schema.get("minLength", 0), schema.get("maxLength")

    def fast(value: str) -> str | None:
        if len(value) < shortest or (longest is not None and len(value) > longest):
            return None
        if pattern is not None and pattern.fullmatch(value) is None:
            return None
        return value

    return fast


def check_parameters(errors: list[dict[str, Any]]) -> None:
    """400 with every parameter error at once, as FastAPI answered."""
    if errors:
        raise validation_failed(errors)
