"""Application errors and the one place where every non-2xx response is shaped.

AppError                     {code, message[, details]} with an HTTP status
├── ValidationFailed         400 validation_error
├── Unauthorized             401 unauthorized
├── NotFound                 404 not_found
├── MethodNotAllowed         405 method_not_allowed
├── Conflict                 409 conflict (details.reason tells which)
├── PayloadTooLarge          413 payload_too_large
├── UnsupportedMediaType     415 unsupported_media_type
├── PreconditionRequired     428 precondition_required
└── Unavailable              503 unavailable
anything else                500 internal_error, logged with its traceback, never shown
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import asyncpg
import orjson
import structlog
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

log = structlog.get_logger("orders_api.errors")


class ErrorBody(BaseModel):
    """The body of every non-2xx response."""

    model_config = ConfigDict(extra="forbid")  # documented as closed: nothing else is ever sent

    code: str
    message: str
    details: dict[str, Any] | None = None


class AppError(Exception):
    status = 500
    code = "internal_error"

    def __init__(
        self,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        self.headers = headers


class ValidationFailed(AppError):
    status = 400
    code = "validation_error"


class Unauthorized(AppError):
    status = 401
    code = "unauthorized"


class NotFound(AppError):
    status = 404
    code = "not_found"


class MethodNotAllowed(AppError):
    status = 405
    code = "method_not_allowed"


class Conflict(AppError):
    status = 409
    code = "conflict"


class PayloadTooLarge(AppError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(AppError):
    status = 415
    code = "unsupported_media_type"


class PreconditionRequired(AppError):
    status = 428
    code = "precondition_required"


class Unavailable(AppError):
    status = 503
    code = "unavailable"


def request_in_progress() -> Conflict:
    return Conflict(
        "another request on the same resource is still in progress; retry",
        {"reason": "request_in_progress"},
        headers={"Retry-After": "1"},
    )


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return orjson.dumps(body)


def error_response(error: AppError) -> Response:
    return Response(
        error_body(error.code, error.message, error.details),
        status_code=error.status,
        headers=error.headers,
        media_type="application/json",
    )


class ReplicationNotConfirmed(Exception):
    """A commit whose wait for the synchronous standby was cancelled (statement timeout,
    cancel request, shutdown): it is visible on this server but a failover may lose it, so it
    must not be acknowledged."""


# What the driver raises when the database could not do it now (or is gone): each is
# translated by database_error; anything else is a bug (500).
DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # a pooled connection the server dropped mid-protocol
    OSError,
    TimeoutError,
    ReplicationNotConfirmed,
)
_LOCK_NOT_AVAILABLE = "55P03"  # lock_timeout
_QUERY_CANCELED = "57014"  # statement_timeout
# Shutdown, crash, starting up, too many connections, a write on a standby (failover).
_UNAVAILABLE_STATES = frozenset({"57P01", "57P02", "57P03", "53300", "25006"})


def database_error(exc: BaseException) -> AppError | None:
    """The error the client should see for a driver failure, or None when it is a bug."""
    sqlstate = getattr(exc, "sqlstate", None) or ""
    if sqlstate == _LOCK_NOT_AVAILABLE:
        return request_in_progress()
    if sqlstate == _QUERY_CANCELED:
        return Unavailable("database statement timed out", headers={"Retry-After": "1"})
    if isinstance(exc, TimeoutError):
        return Unavailable("database busy, retry later", headers={"Retry-After": "1"})
    if isinstance(exc, ReplicationNotConfirmed):
        return Unavailable(
            "the change is not confirmed by the standby yet; retry with the same request",
            headers={"Retry-After": "1"},
        )
    if (
        isinstance(
            exc,
            OSError
            | asyncpg.PostgresConnectionError
            | asyncpg.InterfaceError
            | asyncpg.InternalClientError,
        )
        or sqlstate.startswith("08")
        or sqlstate in _UNAVAILABLE_STATES
    ):
        return Unavailable("database unavailable", headers={"Retry-After": "1"})
    return None


def validation_failed(
    errors: Sequence[Any], message: str = "request validation failed"
) -> AppError:
    """400 with pydantic's error list, reduced to what a client can use (no echoed input)."""
    details = [
        {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": err["type"]}
        for err in errors
    ]
    return ValidationFailed(message, {"errors": details})


def allowed_methods(request: Request, fallback: str) -> str:
    """Every method routed on this path (from the OpenAPI paths, else the router's `fallback`),
    and HEAD wherever GET is (the request context serves HEAD as GET without the body)."""
    table: list[tuple[re.Pattern[str], list[str]]] | None = getattr(
        request.app.state, "allow", None
    )
    if table is None:
        table = [
            (re.compile(re.sub(r"\{[^/]+\}", "[^/]+", path)), [m.upper() for m in ops])
            for path, ops in request.app.openapi()["paths"].items()
        ]
        request.app.state.allow = table
    path = request.url.path
    found = next((methods for pattern, methods in table if pattern.fullmatch(path)), None)
    methods = set(found if found is not None else fallback.replace(" ", "").split(","))
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods - {""}))


_STATUS_CODES = {
    400: ValidationFailed,
    401: Unauthorized,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
    428: PreconditionRequired,
    503: Unavailable,
}


async def app_error_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AppError)
    return error_response(exc)


def database_error_response(exc: BaseException) -> Response:
    """The answer to a database failure: 503 / 409 as database_error says, else a logged 500."""
    error = database_error(exc)
    if error is None:
        log.error("database error", exc_info=exc)
        return error_response(AppError("internal error"))
    log.warning("database unavailable", error=error.message, cause=type(exc).__name__)
    return error_response(error)


async def database_error_handler(_request: Request, exc: Exception) -> Response:
    return database_error_response(exc)


async def request_validation_handler(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_failed(exc.errors()))


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own errors (unknown route, 405) in our shape."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 405:
        allow = allowed_methods(request, (exc.headers or {}).get("Allow", ""))
        return error_response(MethodNotAllowed("method not allowed", headers={"Allow": allow}))
    cls = _STATUS_CODES.get(exc.status_code)
    if cls is None:
        return error_response(AppError("internal error"))
    message = "resource not found" if exc.status_code == 404 else str(exc.detail)
    return error_response(cls(message, headers=dict(exc.headers or {}) or None))


async def server_error_handler(_request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback (and the request id), answered with a bland 500."""
    log.error("unhandled error", exc_info=exc)
    return error_response(AppError("internal error"))


# Handlers by exception class, for every layer that dispatches requests (FastAPI and the
# orders routes in front of it); the 500 handler is the server-error middleware's.
EXCEPTION_HANDLERS: dict[Any, Any] = {
    AppError: app_error_handler,
    RequestValidationError: request_validation_handler,
    StarletteHTTPException: http_exception_handler,
    **dict.fromkeys(DATABASE_ERRORS, database_error_handler),
}
