"""Who is asking: the tenant from X-Tenant-Id (behind a trusted gateway) or a verified JWT."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jwt
from fastapi import Request

from orders_api.config import Settings
from orders_api.errors import Unauthorized

TENANT_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


def valid_tenant(value: str | None) -> str:
    if value is None or not TENANT_PATTERN.fullmatch(value):
        raise Unauthorized("a tenant is required: X-Tenant-Id of 1-64 chars [A-Za-z0-9._-]")
    return value


class JwtVerifier:
    """Verifies bearer tokens with one configured key (HS256 secret, RS256/ES256 key or JWKS)."""

    def __init__(self, settings: Settings) -> None:
        self.algorithm = settings.jwt_algorithm
        self.issuer = settings.jwt_issuer or None
        self.audience = settings.jwt_audience or None
        self.claim = settings.jwt_tenant_claim
        self.leeway = settings.jwt_leeway_seconds
        self._keys: dict[str | None, Any] = {}
        if self.algorithm == "HS256":
            if not settings.jwt_secret:
                raise ValueError("AUTH_MODE=jwt with HS256 needs JWT_SECRET")
            self._keys[None] = settings.jwt_secret
        elif settings.jwt_jwks_file:
            jwks = json.loads(Path(settings.jwt_jwks_file).read_text())
            for jwk in jwks.get("keys", []):
                key = jwt.PyJWK.from_dict(jwk, algorithm=self.algorithm)
                self._keys[jwk.get("kid")] = key.key
            if not self._keys:
                raise ValueError("JWT_JWKS_FILE holds no keys")
        elif settings.jwt_public_key_file:
            self._keys[None] = Path(settings.jwt_public_key_file).read_text()
        else:
            raise ValueError(f"AUTH_MODE=jwt with {self.algorithm} needs a public key or JWKS file")

    def tenant_of(self, request: Request) -> str:
        """The tenant claim of the verified bearer token."""
        authorization = request.headers.get("authorization")
        if not authorization:
            raise Unauthorized("missing bearer token")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("expected Authorization: Bearer <token>")
        try:
            header = jwt.get_unverified_header(token.strip())
            key = self._key_for(header.get("kid"))
            claims = jwt.decode(
                token.strip(),
                key=key,
                algorithms=[self.algorithm],
                issuer=self.issuer,
                audience=self.audience,
                leeway=self.leeway,
                options={"require": ["exp", self.claim]},
            )
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid token: {exc}") from None
        value = claims.get(self.claim)
        return valid_tenant(value if isinstance(value, str) else None)

    def _key_for(self, kid: object) -> Any:
        if None in self._keys and len(self._keys) == 1:
            return self._keys[None]
        if isinstance(kid, str) and kid in self._keys:
            return self._keys[kid]
        raise jwt.InvalidKeyError("unknown key id")


# How /openapi.json describes the tenant: one security scheme, applied to every orders
# operation, whose definition follows the configured mode. Handlers read the tenant with
# tenant_of(request), not through FastAPI's parameter resolution, which costs more per request
# than the rest of a read.
TENANT_SCHEME = "tenant"
TENANT_SECURITY: list[dict[str, list[str]]] = [{TENANT_SCHEME: []}]


def tenant_security_scheme(settings: Settings) -> dict[str, Any]:
    """The OpenAPI security scheme of the configured mode."""
    if settings.auth_mode == "jwt":
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": f"An {settings.jwt_algorithm} JWT with an `exp` claim; the tenant is "
            f"its `{settings.jwt_tenant_claim}` claim, matching `{TENANT_PATTERN.pattern}`. "
            "Missing or invalid: 401.",
        }
    return {
        "type": "apiKey",
        "in": "header",
        "name": "X-Tenant-Id",
        "description": "The tenant, set by a trusted gateway, matching "
        f"`{TENANT_PATTERN.pattern}`. Missing or invalid: 401.",
    }


class HeaderTenancy:
    """The tenant is X-Tenant-Id as sent (behind a trusted gateway)."""

    def tenant_of(self, request: Request) -> str:
        return valid_tenant(request.headers.get("x-tenant-id"))


def tenancy_for(settings: Settings) -> HeaderTenancy | JwtVerifier:
    return JwtVerifier(settings) if settings.auth_mode == "jwt" else HeaderTenancy()


def tenant_of(request: Request) -> str:
    """The tenant of the request (401 when missing or invalid), by the configured mode that
    the lifespan put in the request state."""
    tenancy: HeaderTenancy | JwtVerifier = request.scope["state"]["tenancy"]
    return tenancy.tenant_of(request)
