"""DirectRoutes takes only endpoints that need nothing from FastAPI's parameter resolution."""

from __future__ import annotations

import pytest
from fastapi import APIRouter, Header, Request
from starlette.responses import Response

from orders_api.orders.router import router as orders_router
from orders_api.routing import DirectRoutes


async def _next_app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not reached")


def test_orders_routes_are_all_direct() -> None:
    direct = DirectRoutes(_next_app, orders_router.routes, {})
    served = {(method, route.path) for _, methods, route in direct.routes for method in methods}
    assert served == {
        ("POST", "/orders"),
        ("GET", "/orders"),
        ("GET", "/orders/{order_id}"),
        ("PATCH", "/orders/{order_id}/confirm"),
        ("POST", "/orders/{order_id}/close"),
    }


def test_an_endpoint_with_fastapi_parameters_is_refused() -> None:
    router = APIRouter()

    @router.get("/with-header")
    async def with_header(request: Request, x_thing: str = Header()) -> Response:
        return Response()

    with pytest.raises(ValueError, match="takes only the Request"):
        DirectRoutes(_next_app, router.routes, {})
