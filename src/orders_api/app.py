"""create_app(settings): lifespan, routes, middleware, error handlers.

Every request takes one path, built from public Starlette and FastAPI pieces:

    [OpenTelemetry ASGI middleware, when tracing]
    RequestContextMiddleware      request id, size limits, metrics, access log of failures
    ServerErrorMiddleware         a bug -> the bland 500 (and on up to the server's log)
    Router                        the orders routes, each an ASGI endpoint that answers
      |                           AppError / database errors as {code, message} itself;
      default -> FastAPI          everything else: ops routes, docs, 404, 405

The orders handlers take only the Request, so they skip FastAPI's per-request routing,
dependency and exception layers; FastAPI still has them registered and documents them in
/openapi.json, and renders errors with the same functions (errors.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import structlog
from fastapi import Request
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from orders_api import idempotency
from orders_api.config import Settings
from orders_api.db import DatabaseUrlError, parse_database_url
from orders_api.errors import (
    DATABASE_ERRORS,
    EXCEPTION_HANDLERS,
    AppError,
    ErrorBody,
    database_error_response,
    error_body,
    error_response,
    server_error_handler,
)
from orders_api.observability import (
    RequestContextMiddleware,
    configure_logging,
    metrics_endpoint,
    tracer_provider_for,
)
from orders_api.openapi import openapi_for
from orders_api.orders.router import router as orders_router
from orders_api.orders.service import OrderService
from orders_api.orders.store import OrderStore
from orders_api.outbox import RelayWakeUp
from orders_api.pagination import CursorSecret
from orders_api.pool import Pool
from orders_api.tenancy import tenancy_for

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = structlog.get_logger("orders_api.app")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Endpoint:
    """An orders handler as the ASGI app of its route: the Request in, its Response out.

    An AppError or a database failure is answered here, by the same functions FastAPI's
    exception handlers use; anything else is a bug and goes on to ServerErrorMiddleware.
    """

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            response = await self.handler(Request(scope, receive))
        except AppError as exc:
            response = error_response(exc)
        except DATABASE_ERRORS as exc:
            response = database_error_response(exc)
        await response(scope, receive, send)


class DirectRoute(Route):
    """A route of the front Router that takes only its own methods: a request with another
    method is no match at all, so it goes on to FastAPI, which answers the 405 with Allow."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        return (Match.NONE, {}) if match is Match.PARTIAL else (match, child_scope)


def create_app(
    settings: Settings | None = None,
    clock: Clock = utc_now,
    tracer_provider: TracerProvider | None = None,
) -> ASGIApp:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    if not settings.database_url:
        raise DatabaseUrlError(
            "DATABASE_URL is not set: `orders-api serve` provides the embedded PostgreSQL"
        )
    parse_database_url(settings.database_url)  # a wrong URL fails here, not per request
    tenancy = tenancy_for(settings)
    provider = tracer_provider or tracer_provider_for(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[dict[str, Any]]:
        pool = Pool.from_settings("api", settings)
        try:
            secret = CursorSecret(pool, settings.cursor_secret)
            if provider is not None:  # a CLIENT span per statement
                from opentelemetry.trace import get_tracer

                pool.tracer = get_tracer("orders_api.pool", tracer_provider=provider)
            window = timedelta(seconds=settings.idempotency_window_seconds)
            store = OrderStore(pool)
            wake_relay = RelayWakeUp(store.wake_relay)
            orders = OrderService(store, clock, window, secret, wake_relay)
            purge = asyncio.create_task(_purge_keys_forever(pool, clock, window, settings))
            try:
                yield {"orders": orders, "tenancy": tenancy, "pool": pool}
            finally:
                purge.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await purge
                await wake_relay.close()
        finally:
            await pool.close()

    api = FastAPIOffline(
        title="orders-api",
        version="0.1.0",
        description="Multi-tenant orders: idempotent create, optimistic locking, "
        "keyset pagination, transactional outbox.",
        servers=[{"url": "/", "description": "the server that serves this document"}],
        license_info={"name": "Proprietary"},
        openapi_tags=[
            {"name": "orders", "description": "Orders of the caller's tenant"},
            {"name": "ops", "description": "Health, readiness and metrics (no tenant)"},
        ],
        # FastAPI's native OpenTelemetry would check the global providers on every request:
        # tracing, when on, is the ASGI middleware in front of everything.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        exception_handlers={**EXCEPTION_HANDLERS, Exception: server_error_handler},
    )
    api.include_router(orders_router)
    no_tenant: dict[str, Any] = {"security": []}  # the ops routes answer anyone
    api.add_api_route(
        "/healthz",
        healthz,
        methods=["GET"],
        tags=["ops"],
        operation_id="healthz",
        summary="Liveness",
        response_model=None,
        responses={200: {"model": Health, "description": "The process is up"}},
        openapi_extra=no_tenant,
    )
    api.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        tags=["ops"],
        operation_id="readyz",
        summary="Readiness",
        responses={
            200: {"model": Readiness, "description": "The database answers"},
            503: {"model": ErrorBody, "description": "`unavailable`: it does not, within 2 s"},
        },
        openapi_extra=no_tenant,
    )
    api.add_api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        tags=["ops"],
        operation_id="metrics",
        summary="Prometheus metrics",
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format"}},
        openapi_extra=no_tenant,
    )
    # FastAPI's documented way to extend the document: replace the method that builds it.
    api.openapi = openapi_for(api, settings)  # type: ignore[method-assign]
    direct = [
        DirectRoute(
            route.path, Endpoint(route.endpoint), methods=list(route.methods or ()), name=route.name
        )
        for route in orders_router.routes
        if isinstance(route, APIRoute)
    ]
    front = Router(routes=direct, default=api, lifespan=lifespan)
    app: ASGIApp = RequestContextMiddleware(
        ServerErrorMiddleware(front, handler=server_error_handler),
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
    )
    if provider is not None:
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        app = OpenTelemetryMiddleware(
            app,
            tracer_provider=provider,
            default_span_details=_span_details([*direct, *api.router.routes]),
        )
    return app


def _span_details(routes: list[BaseRoute]) -> Callable[[Scope], tuple[str, dict[str, Any]]]:
    """Server spans named by method and route template, as FastAPI's instrumentation does.

    Only routes with a template count: FastAPI's included router matches the orders paths
    too, but has none (it would name spans after the raw path, one name per order)."""

    def details(scope: Scope) -> tuple[str, dict[str, Any]]:
        method = scope.get("method", "HTTP")
        for route in routes:
            path = getattr(route, "path", None)
            if isinstance(path, str) and route.matches(scope)[0] is Match.FULL:
                return f"{method} {path}", {"http.route": path}
        return method, {}

    return details


def create_app_from_env() -> ASGIApp:
    """Factory for uvicorn workers: each reads the same environment."""
    return create_app(Settings())


class Health(BaseModel):
    """The answer of /healthz."""

    status: Literal["ok"]


class Readiness(BaseModel):
    """The answer of /readyz when the database answers."""

    status: Literal["ready"]


async def healthz() -> dict[str, str]:
    """The process is up (the database is not asked)."""
    return {"status": "ok"}


async def readyz(request: Request) -> Response:
    """The pool that serves requests gets an answer from the database within 2 s."""
    pool: Pool = request.state.pool
    try:
        await pool.ping(within=2)
    except Exception as exc:
        log.warning("not ready", error=type(exc).__name__)
        return Response(
            error_body("unavailable", "database unreachable"),
            status_code=503,
            media_type="application/json",
        )
    return Response(b'{"status":"ready"}', media_type="application/json")


async def _purge_keys_forever(
    pool: Pool, clock: Clock, window: timedelta, settings: Settings
) -> None:
    """Expired idempotency keys are deleted in the background by every worker (cheap, batched)."""
    while True:
        await asyncio.sleep(settings.idempotency_purge_interval_seconds)
        try:
            removed = await idempotency.purge_expired_keys(pool, window, clock())
        except Exception as exc:  # an outage must not end the loop; the next round retries
            log.warning("idempotency purge failed", error=type(exc).__name__)
        else:
            if removed:
                log.info("purged idempotency keys", removed=removed)
