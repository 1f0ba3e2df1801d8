"""JSON logs with a request id, OpenTelemetry spans, Prometheus metrics."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


from orders_api.config import Settings
from orders_api.errors import PayloadTooLarge, ValidationFailed, error_response

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

REQUESTS = Counter("orders_api_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "orders_api_http_request_duration_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
_IDEMPOTENCY = Counter(
    "orders_api_idempotency_total",
    "Requests with an Idempotency-Key by operation and outcome",
    ["operation", "outcome"],
)
IDEMPOTENCY = {
    (operation, outcome): _IDEMPOTENCY.labels(operation, outcome)
    for operation in ("create", "confirm", "close")
    for outcome in ("created", "replayed", "conflict")
}

log = structlog.get_logger("orders_api.access")
# The request being served (set by RequestContextMiddleware): on every log line and on 500s.
REQUEST_ID: ContextVar[str | None] = ContextVar("orders_api_request_id", default=None)


def add_request_id(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> Any:
    """structlog processor: the current request id, when there is one."""
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def configure_logging(level: str) -> None:
    """structlog renders JSON; stdlib records (uvicorn, sqlalchemy) go through the same renderer."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        add_request_id,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


class RequestContextMiddleware:
    """Request id (taken from X-Request-ID or made), access log, metrics, size limits.

    The body limit answers 413 from Content-Length before anything is read; a chunked body
    is counted as it streams and fails with 413 the moment it passes the limit. uvicorn's
    httptools parser sets no bound on header size, so headers larger than max_header_bytes
    in total are refused here with 400 before any route runs.

    It runs on every request, so what can be is done once: one pass over the headers, the
    metric children cached per (method, route, status), the request id in one ContextVar
    (read by the log processor add_request_id) rather than structlog's contextvars.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_header_bytes: int = 16384) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self._metrics: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        header_bytes = 0
        incoming: bytes | None = None
        declared: bytes | None = None
        streamed = False
        for name, value in scope["headers"]:
            header_bytes += len(name) + len(value) + 4
            if name == b"x-request-id":
                if incoming is None:
                    incoming = value
            elif name == b"content-length":
                if declared is None:
                    declared = value
            elif name == b"transfer-encoding":
                streamed = True
        request_id = _request_id(incoming)
        REQUEST_ID.set(request_id)
        id_header = (b"x-request-id", request_id.encode())
        status = 500
        method = scope["method"]
        head = method == "HEAD"
        if head:
            # HEAD is GET without the body (RFC 9110), on every GET route.
            scope = {**scope, "method": "GET"}

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            elif head and message.get("body"):
                message = {**message, "body": b""}
            await send(message)

        try:
            if header_bytes > self.max_header_bytes:
                too_large = ValidationFailed(
                    f"request headers are larger than {self.max_header_bytes} bytes",
                    {"reason": "headers_too_large"},
                )
                await error_response(too_large)(scope, receive, send_with_id)
                return
            length = _content_length(declared)
            if length is not None and length > self.max_body_bytes:
                await error_response(_too_large(self.max_body_bytes))(scope, receive, send_with_id)
                return
            # With a Content-Length the server delivers no more than declared; only a body
            # without one (chunked) is counted as it arrives.
            limited = receive if declared is not None and not streamed else self._limited(receive)
            await self.app(scope, limited, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            key = (method, template, status)
            children = self._metrics.get(key)
            if children is None:
                children = (
                    REQUESTS.labels(method, template, str(status)),
                    LATENCY.labels(method, template),
                )
                self._metrics[key] = children
            children[0].inc()
            children[1].observe(elapsed)
            if status >= 500:
                log.warning(
                    "request", method=method, path=scope["path"], status=status, ms=elapsed * 1000
                )

    def _limited(self, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _too_large(limit)
            return message

        return receive_limited


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body is larger than {limit} bytes")


def _request_id(incoming: bytes | None) -> str:
    """The client's X-Request-ID when usable, else a new one (32 hex digits)."""
    if incoming is not None:
        candidate = incoming.decode("latin-1")
        if _REQUEST_ID.fullmatch(candidate):
            return candidate
    return os.urandom(16).hex()


def _content_length(value: bytes | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


async def metrics_endpoint(_request: Request) -> Response:
    """Prometheus exposition; aggregates all workers when PROMETHEUS_MULTIPROC_DIR is set."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        payload = generate_latest(registry)
    else:
        payload = generate_latest()
    return Response(payload, media_type=CONTENT_TYPE_LATEST)


def tracer_provider_for(settings: Settings) -> TracerProvider | None:
    """The span exporter OTEL_EXPORTER asks for (console, or otlp with the standard
    OTEL_EXPORTER_OTLP_* variables), made the global provider; None when tracing is off, so
    the request path carries no instrumentation at all."""
    if settings.otel_exporter == "none":
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )

    span_exporter: SpanExporter
    if settings.otel_exporter == "console":
        span_exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        span_exporter = OTLPSpanExporter()
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.otel_service_name})
    )
    provider.add_span_processor(BatchSpanProcessor(span_exporter))
    trace.set_tracer_provider(provider)
    return provider
