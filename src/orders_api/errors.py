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

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
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


# SQLSTATEs that mean "the database could not do it now", not "the request is wrong".
_LOCK_NOT_AVAILABLE = "55P03"
_QUERY_CANCELED = "57014"
# SQLite primary result codes for a database file that cannot be opened or used right now:
# SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN (an outage of the embedded database, not a bug).
_SQLITE_FILE_UNUSABLE = frozenset({10, 13, 14})


def database_error(exc: DBAPIError | PoolTimeout) -> AppError | None:
    """Translate a driver failure into the error the client should see, or None for a bug."""
    if isinstance(exc, PoolTimeout):
        return Unavailable("database busy, retry later", headers={"Retry-After": "1"})
    sqlstate = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    if sqlstate == _LOCK_NOT_AVAILABLE:
        return request_in_progress()
    if sqlstate == _QUERY_CANCELED:
        return Unavailable("database statement timed out", headers={"Retry-After": "1"})
    message = str(exc.orig).lower()
    if isinstance(exc, OperationalError) and ("locked" in message or "busy" in message):
        return Unavailable("database busy, retry later", headers={"Retry-After": "1"})
    if exc.connection_invalidated or _is_connection_error(exc.orig):
        return Unavailable("database unavailable", headers={"Retry-After": "1"})
    if ((getattr(exc.orig, "sqlite_errorcode", 0) or 0) & 0xFF) in _SQLITE_FILE_UNUSABLE:
        return Unavailable("database unavailable", headers={"Retry-After": "1"})
    return None


def _is_connection_error(orig: BaseException | None) -> bool:
    if orig is None:
        return False
    if isinstance(orig, OSError | ConnectionError):
        return True
    name = type(orig).__name__
    return name in {
        "ConnectionDoesNotExistError",
        "ConnectionFailureError",
        "CannotConnectNowError",
        "InterfaceError",
        "AdminShutdownError",
        "CrashShutdownError",
        "TooManyConnectionsError",
    } or (getattr(orig, "sqlstate", "") or "").startswith("08")


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
    """Every method routed on this path (from the OpenAPI paths), for the Allow header."""
    table: list[tuple[re.Pattern[str], str]] | None = getattr(request.app.state, "allow", None)
    if table is None:
        table = [
            (
                re.compile(re.sub(r"\{[^/]+\}", "[^/]+", path)),
                ", ".join(sorted(map(str.upper, ops))),
            )
            for path, ops in request.app.openapi()["paths"].items()
        ]
        request.app.state.allow = table
    path = request.url.path
    return next((methods for pattern, methods in table if pattern.fullmatch(path)), fallback)


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


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_request: Request, exc: AppError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> Response:
        return error_response(validation_failed(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:
            allow = allowed_methods(request, (exc.headers or {}).get("Allow", ""))
            return error_response(MethodNotAllowed("method not allowed", headers={"Allow": allow}))
        cls = _STATUS_CODES.get(exc.status_code)
        if cls is None:
            return error_response(AppError("internal error"))
        message = "resource not found" if exc.status_code == 404 else str(exc.detail)
        return error_response(cls(message, headers=dict(exc.headers or {}) or None))

    @app.exception_handler(DBAPIError)
    async def _dbapi(request: Request, exc: DBAPIError) -> Response:
        return _database_failure(request, exc)

    @app.exception_handler(PoolTimeout)
    async def _pool(request: Request, exc: PoolTimeout) -> Response:
        return _database_failure(request, exc)

    @app.exception_handler(OSError)
    async def _os(request: Request, exc: OSError) -> Response:
        # asyncpg raises plain OSError / ConnectionRefusedError when it cannot connect.
        log.warning("database connection failed", error=type(exc).__name__)
        return error_response(Unavailable("database unavailable", headers={"Retry-After": "1"}))

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(AppError("internal error"))


def _database_failure(_request: Request, exc: DBAPIError | PoolTimeout) -> Response:
    error = database_error(exc)
    if error is None:
        log.error("database error", exc_info=exc)
        return error_response(AppError("internal error"))
    log.warning("database unavailable", error=error.message)
    return error_response(error)
