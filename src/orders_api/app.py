"""create_app(settings): lifespan, routers, middleware, error handlers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog
from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from sqlalchemy import event, text
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from orders_api import idempotency
from orders_api.config import Settings
from orders_api.db import create_engine
from orders_api.errors import ErrorBody, error_body, install_error_handlers
from orders_api.observability import (
    POOL_IN_USE,
    RequestContextMiddleware,
    configure_logging,
    metrics_endpoint,
    setup_tracing,
)
from orders_api.orders import pg as orders_pg
from orders_api.orders.router import router as orders_router
from orders_api.orders.service import Backend
from orders_api.routing import DirectRoutes
from orders_api.tenancy import JwtVerifier

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = structlog.get_logger("orders_api.app")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def create_app(
    settings: Settings | None = None,
    clock: Clock = utc_now,
    tracer_provider: TracerProvider | None = None,
) -> FastAPI:
    settings = settings or Settings()
    configure_logging(settings.log_level)
    tracing = tracer_provider is not None or settings.otel_exporter != "none"

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        _count_pool_usage(engine)
        state = app.state
        state.engine = engine
        state.reader = engine.execution_options(readonly=True)
        pg = None if settings.is_sqlite else await orders_pg.connect(settings)
        state.backend = Backend(engine, state.reader, pg)
        state.cursor_secret = settings.cursor_secret.encode() or None
        setup_tracing(
            app, engine, settings.otel_exporter, settings.otel_service_name, tracer_provider
        )
        if pg is not None and tracing:
            pg.trace_with(tracer_provider)
        purge = asyncio.create_task(_purge_keys_forever(state, settings))
        try:
            yield
        finally:
            purge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purge
            if pg is not None:
                await pg.pool.close()
            await engine.dispose()

    app = OrdersAPI(
        title="orders-api",
        version="0.1.0",
        description="Multi-tenant orders: idempotent create, optimistic locking, "
        "keyset pagination, transactional outbox.",
        lifespan=lifespan,
        responses={422: {"model": ErrorBody, "description": "never sent: see 400"}},
        # FastAPI's native OpenTelemetry checks the global providers on every request; with
        # tracing off (the default) that is settled here, once.
        telemetry=None if tracing else {"tracing": False, "metrics": False, "logs": False},
        docs_url=None,
        redoc_url=None,
    )
    _serve_docs_offline(app)
    app.state.settings = settings
    app.state.clock = clock
    app.state.idempotency_window = timedelta(seconds=settings.idempotency_window_seconds)
    app.state.jwt_verifier = JwtVerifier(settings) if settings.auth_mode == "jwt" else None
    install_error_handlers(app)
    app.include_router(orders_router)
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["ops"])
    app.add_api_route(
        "/readyz", readyz, methods=["GET"], tags=["ops"], responses={503: {"model": ErrorBody}}
    )
    app.add_api_route(
        "/metrics",
        metrics_endpoint,
        methods=["GET"],
        tags=["ops"],
        response_class=PlainTextResponse,
        responses={200: {"description": "Prometheus text exposition format"}},
    )
    _document_parameters_as_strings(app)
    app.front = RequestContextMiddleware(
        # With tracing on, the instrumentation's middleware inside FastAPI sees every request.
        DirectRoutes(
            app.behind_front, [] if tracing else orders_router.routes, app.exception_handlers
        ),
        max_body_bytes=settings.max_body_bytes,
        max_header_bytes=settings.max_header_bytes,
    )
    return app


class OrdersAPI(FastAPI):
    """FastAPI with the request context and the orders routes in front of it.

    Every HTTP request first passes `front`: RequestContextMiddleware (request id, size
    limits, metrics, the access log of failures), then DirectRoutes, which serves the orders
    routes itself and hands anything else to FastAPI as usual (router, documentation,
    404/405, its own 500 handling). The orders routes so skip FastAPI's and Starlette's
    per-request layers, and every response, 500s included, leaves through the request
    context.
    """

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.front is not None and scope["type"] == "http":
            scope["app"] = self
            await self.front(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def behind_front(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI itself: where `front` passes what it does not serve."""
        await super().__call__(scope, receive, send)


def _serve_docs_offline(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts and styles served from here, no CDN:
    the routes fastapi-offline builds, taken from an app it makes for the purpose."""
    docs = FastAPIOffline(title=app.title, openapi_url=app.openapi_url)
    app.router.routes.extend(
        route for route in docs.router.routes if getattr(route, "path", None) != app.openapi_url
    )


def _document_parameters_as_strings(app: FastAPI) -> None:
    """An optional header or query parameter is absent or a string, never JSON null: drop the
    `anyOf [..., null]` that `str | None` produces, so clients and fuzzers never send "null"."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            for operations in schema["paths"].values():
                for operation in operations.values():
                    for parameter in operation.get("parameters", []):
                        _drop_null_branch(parameter["schema"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_null_branch(schema: dict[str, Any]) -> None:
    branches = [branch for branch in schema.get("anyOf", []) if branch != {"type": "null"}]
    if "anyOf" in schema and len(branches) == 1:
        del schema["anyOf"]
        schema.update(branches[0])


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers: each reads the same environment."""
    return create_app(Settings())


async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


async def readyz(request: Request) -> Response:
    """The database answers."""
    try:
        async with request.app.state.reader.connect() as conn:
            await asyncio.wait_for(conn.execute(text("SELECT 1")), timeout=2)
    except Exception as exc:
        log.warning("not ready", error=type(exc).__name__)
        return Response(
            error_body("unavailable", "database unreachable"),
            status_code=503,
            media_type="application/json",
        )
    return Response(b'{"status":"ready"}', media_type="application/json")


def _count_pool_usage(engine: Any) -> None:
    pool_events = engine.sync_engine.pool

    @event.listens_for(pool_events, "checkout")
    def _checkout(*_: Any) -> None:
        POOL_IN_USE.inc()

    @event.listens_for(pool_events, "checkin")
    def _checkin(*_: Any) -> None:
        POOL_IN_USE.dec()


async def _purge_keys_forever(state: Any, settings: Settings) -> None:
    """Expired idempotency keys are deleted in the background by every worker (cheap, batched)."""
    window = timedelta(seconds=settings.idempotency_window_seconds)
    while True:
        await asyncio.sleep(settings.idempotency_purge_interval_seconds)
        try:
            removed = await idempotency.purge_expired_keys(state.engine, window, state.clock())
        except Exception as exc:  # an outage must not end the loop; the next round retries
            log.warning("idempotency purge failed", error=type(exc).__name__)
        else:
            if removed:
                log.info("purged idempotency keys", removed=removed)
