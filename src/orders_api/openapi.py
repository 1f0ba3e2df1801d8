"""/openapi.json: FastAPI's document plus what its route declarations cannot say themselves.

The orders handlers take only the Request, so FastAPI sees neither their request bodies nor
the tenant: the router names each body by a `$ref` (REQUEST_BODIES) and marks its operations
with the tenant's security requirement; here the bodies' schemas and the security scheme of
the configured mode (X-Tenant-Id, or a bearer JWT) join the components.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from orders_api.config import Settings
from orders_api.orders.router import REQUEST_BODIES
from orders_api.tenancy import TENANT_SCHEME, tenant_security_scheme

REF_TEMPLATE = "#/components/schemas/{model}"


def complete_document(document: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """`document` with the request bodies' schemas and the tenant's security scheme."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name, model in REQUEST_BODIES.items():
        schema = model.model_json_schema(ref_template=REF_TEMPLATE)
        for defined, definition in {**schema.pop("$defs", {}), name: schema}.items():
            if schemas.setdefault(defined, definition) != definition:
                raise ValueError(f"two different schemas are named {defined}")
    components["securitySchemes"] = {TENANT_SCHEME: tenant_security_scheme(settings)}
    return document


def openapi_for(api: FastAPI, settings: Settings) -> Callable[[], dict[str, Any]]:
    """A replacement for `api.openapi`: the completed document, built once."""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            api.openapi_schema = complete_document(build(), settings)
        return api.openapi_schema

    return openapi
