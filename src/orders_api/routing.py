"""Direct dispatch for the routes that carry the traffic."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.routing import APIRoute
from starlette._utils import get_route_path
from starlette.requests import Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send


class DirectRoutes:
    """ASGI app in front of FastAPI: a request whose method and path match one of `routes`
    goes straight to that route's endpoint; any other, including a known path with another
    method (405), goes on to `app` (FastAPI).

    Starlette's and FastAPI's per-request layers (error middlewares, the scan over every
    route, the exit stack, dependency solving, the wrappers around send) cost more CPU than
    the rest of a request on these routes, and they do nothing for them: their endpoints take
    the Request and return a Response, with no FastAPI parameters or dependencies (checked
    here). An exception goes to the app's exception handler for its type, as
    ExceptionMiddleware would send it; one without goes to the app's 500 handler, as
    ServerErrorMiddleware would, and on up to the server's log. The routes stay registered
    with FastAPI, which documents them in /openapi.json.
    """

    def __init__(
        self,
        app: ASGIApp,
        routes: Sequence[BaseRoute],
        exception_handlers: Mapping[Any, Any],
    ) -> None:
        self.app = app
        self.routes: list[tuple[re.Pattern[str], set[str], APIRoute]] = []
        for route in routes:
            if not isinstance(route, APIRoute) or route.methods is None:
                raise ValueError(f"{route}: a direct route is an APIRoute with methods")
            dependant = route.dependant
            if (
                dependant.dependencies
                or dependant.path_params
                or dependant.query_params
                or dependant.header_params
                or dependant.cookie_params
                or dependant.body_params
                or dependant.request_param_name is None
            ):
                raise ValueError(f"{route.path}: a direct route takes only the Request")
            self.routes.append((route.path_regex, route.methods, route))
        # What ExceptionMiddleware handles; Exception (500) is ServerErrorMiddleware's.
        self.handlers = {
            key: handler
            for key, handler in exception_handlers.items()
            if key not in (500, Exception)
        }
        self.server_error = exception_handlers.get(Exception) or exception_handlers.get(500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = get_route_path(scope)
            method = scope["method"]
            for regex, methods, route in self.routes:
                if method in methods:
                    match = regex.match(path)
                    if match is not None:
                        scope["route"] = route
                        scope["endpoint"] = route.endpoint
                        scope["path_params"] = match.groupdict()
                        await self._serve(route, scope, receive, send)
                        return
        await self.app(scope, receive, send)

    async def _serve(self, route: APIRoute, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            handler = next(
                (self.handlers[cls] for cls in type(exc).__mro__ if cls in self.handlers), None
            )
            if handler is None:
                # A bug: answered as ServerErrorMiddleware would, with the app's 500 handler,
                # and the exception goes on up to the server, which logs it.
                if self.server_error is not None:
                    await (await self.server_error(request, exc))(scope, receive, send)
                raise
            response = await handler(request, exc)
        await response(scope, receive, send)
