"""AUTH_MODE=jwt: bearer tokens verified with an HS256 secret, an RS256 or ES256 public key, or
a JWKS file; exp (required), nbf, iss and aud checked; tenant from the configured claim.
Every refusal is 401 unauthorized with the error shape. Header mode stays the default."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from orders_api.app import create_app
from orders_api.config import Settings
from tests.helpers import make_settings

SECRET = "s3cret-for-tests-only-" + "0123456789abcdef" * 4  # long enough for HS512 too
ISSUER = "https://issuer.test"
AUDIENCE = "orders-api"


def assert_unauthorized(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    body = response.json()
    assert set(body) == {"code", "message"}, body
    assert body["code"] == "unauthorized"


@asynccontextmanager
async def jwt_client(database_url: str, **settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(database_url, auth_mode="jwt", **settings))
    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client


def claims(tenant: str, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"tenant_id": tenant, "exp": now + 300, "iat": now, **extra}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def pem_private(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_public(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def unsigned_token(payload: dict[str, Any]) -> str:
    """alg=none: header and claims, no signature."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(payload)}."


# --- HS256 --------------------------------------------------------------------------------


async def test_hs256_token_names_the_tenant(database_url: str, tenant: str) -> None:
    async with jwt_client(database_url, jwt_secret=SECRET) as client:
        token = jwt.encode(claims(tenant), SECRET, algorithm="HS256")
        created = await client.post("/orders", headers={**bearer(token), "Idempotency-Key": "k"})
        assert created.status_code == 201, created.text
        assert created.json()["tenantId"] == tenant
        # The tenant comes from the token only: X-Tenant-Id is ignored in jwt mode.
        other = jwt.encode(claims("someone-else"), SECRET, algorithm="HS256")
        response = await client.get(
            f"/orders/{created.json()['id']}", headers={**bearer(other), "X-Tenant-Id": tenant}
        )
        assert response.status_code == 404
        assert_unauthorized(await client.get("/orders", headers={"X-Tenant-Id": tenant}))


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "not-bearer",
        "empty-bearer",
        "garbage",
        "two-parts",
        "alg-none",
        "wrong-secret",
        "expired",
        "no-exp",
        "no-tenant-claim",
        "tenant-not-a-string",
        "tenant-bad-chars",
        "not-yet-valid",
        "hs512",
        "tampered-claims",
    ],
)
async def test_hs256_refusals_are_401(database_url: str, tenant: str, case: str) -> None:
    now = int(time.time())

    def hs(payload: dict[str, Any], secret: str = SECRET, algorithm: str = "HS256") -> str:
        return "Bearer " + jwt.encode(payload, secret, algorithm=algorithm)

    def tampered() -> str:
        header, _, signature = jwt.encode(claims(tenant), SECRET, algorithm="HS256").split(".")
        forged = json.dumps(claims("victim")).encode()
        payload = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
        return f"Bearer {header}.{payload}.{signature}"

    tokens: dict[str, Callable[[], str | None]] = {
        "missing": lambda: None,
        "not-bearer": lambda: f"Basic {base64.b64encode(b'a:b').decode()}",
        "empty-bearer": lambda: "Bearer   ",
        "garbage": lambda: "Bearer not.a.jwt",
        "two-parts": lambda: "Bearer abc.def",
        "alg-none": lambda: f"Bearer {unsigned_token(claims(tenant))}",
        "wrong-secret": lambda: hs(claims(tenant), secret=SECRET[::-1]),
        "expired": lambda: hs(claims(tenant, exp=now - 10)),
        "no-exp": lambda: hs({"tenant_id": tenant}),
        "no-tenant-claim": lambda: hs({"exp": now + 60}),
        "tenant-not-a-string": lambda: hs({"exp": now + 60, "tenant_id": 7}),
        "tenant-bad-chars": lambda: hs(claims("a b/c")),
        "not-yet-valid": lambda: hs(claims(tenant, nbf=now + 120)),
        "hs512": lambda: hs(claims(tenant), algorithm="HS512"),
        "tampered-claims": tampered,
    }
    value = tokens[case]()
    headers = {} if value is None else {"Authorization": value}
    async with jwt_client(database_url, jwt_secret=SECRET) as client:
        for method, path in (("GET", "/orders"), ("POST", "/orders")):
            response = await client.request(
                method, path, headers={**headers, "Idempotency-Key": "k"}
            )
            assert_unauthorized(response)


async def test_issuer_and_audience_are_checked_when_configured(
    database_url: str, tenant: str
) -> None:
    settings = {"jwt_secret": SECRET, "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE}
    async with jwt_client(database_url, **settings) as client:

        async def status(**extra: Any) -> int:
            token = jwt.encode(claims(tenant, **extra), SECRET, algorithm="HS256")
            return (await client.get("/orders", headers=bearer(token))).status_code

        assert await status(iss=ISSUER, aud=AUDIENCE) == 200
        assert await status(iss=ISSUER, aud=[AUDIENCE, "other"]) == 200
        assert await status(iss="https://evil.test", aud=AUDIENCE) == 401
        assert await status(iss=ISSUER, aud="another-api") == 401
        assert await status(aud=AUDIENCE) == 401  # issuer missing
        assert await status(iss=ISSUER) == 401  # audience missing


async def test_leeway_tolerates_small_clock_skew(database_url: str, tenant: str) -> None:
    expired = jwt.encode(claims(tenant, exp=int(time.time()) - 5), SECRET, algorithm="HS256")
    async with jwt_client(database_url, jwt_secret=SECRET, jwt_leeway_seconds=30) as client:
        assert (await client.get("/orders", headers=bearer(expired))).status_code == 200
    async with jwt_client(database_url, jwt_secret=SECRET) as client:
        assert_unauthorized(await client.get("/orders", headers=bearer(expired)))


async def test_a_configured_tenant_claim_is_used(database_url: str, tenant: str) -> None:
    async with jwt_client(database_url, jwt_secret=SECRET, jwt_tenant_claim="org") as client:
        good = jwt.encode(claims("ignored", org=tenant), SECRET, algorithm="HS256")
        response = await client.post("/orders", headers={**bearer(good), "Idempotency-Key": "k"})
        assert response.json()["tenantId"] == tenant
        without = jwt.encode(claims(tenant), SECRET, algorithm="HS256")
        assert_unauthorized(await client.get("/orders", headers=bearer(without)))


# --- RS256 / ES256 public keys and JWKS -----------------------------------------------------


@pytest.mark.parametrize("algorithm", ["RS256", "ES256"])
async def test_public_key_verification(
    database_url: str, tenant: str, tmp_path: Path, algorithm: str
) -> None:
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    other: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        other = ec.generate_private_key(ec.SECP256R1())
    public_file = tmp_path / "public.pem"
    public_file.write_text(pem_public(key))
    settings = {"jwt_algorithm": algorithm, "jwt_public_key_file": str(public_file)}
    async with jwt_client(database_url, **settings) as client:
        good = jwt.encode(claims(tenant), pem_private(key), algorithm=algorithm)
        response = await client.post("/orders", headers={**bearer(good), "Idempotency-Key": "k"})
        assert response.status_code == 201
        assert response.json()["tenantId"] == tenant
        wrong_key = jwt.encode(claims(tenant), pem_private(other), algorithm=algorithm)
        assert_unauthorized(await client.get("/orders", headers=bearer(wrong_key)))
        # Algorithm confusion: an HS256 token "signed" with the public key text is refused.
        confused = _hs256_signed_with(pem_public(key), claims(tenant))
        assert_unauthorized(await client.get("/orders", headers=bearer(confused)))
        assert_unauthorized(
            await client.get("/orders", headers=bearer(unsigned_token(claims(tenant))))
        )
        expired = jwt.encode(
            claims(tenant, exp=int(time.time()) - 1), pem_private(key), algorithm=algorithm
        )
        assert_unauthorized(await client.get("/orders", headers=bearer(expired)))


def _hs256_signed_with(secret: str, payload: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    signing_input = f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(payload)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


async def test_jwks_file_picks_the_key_by_kid(
    database_url: str, tenant: str, tmp_path: Path
) -> None:
    keys = {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in "ab"}
    jwks = {
        "keys": [
            {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "kid": kid}
            for kid, key in keys.items()
        ]
    }
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks))
    settings = {"jwt_algorithm": "RS256", "jwt_jwks_file": str(jwks_file)}
    async with jwt_client(database_url, **settings) as client:
        for kid, key in keys.items():
            token = jwt.encode(claims(tenant), pem_private(key), "RS256", headers={"kid": kid})
            assert (await client.get("/orders", headers=bearer(token))).status_code == 200
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        unknown = jwt.encode(claims(tenant), pem_private(stranger), "RS256", headers={"kid": "c"})
        assert_unauthorized(await client.get("/orders", headers=bearer(unknown)))
        no_kid = jwt.encode(claims(tenant), pem_private(keys["a"]), "RS256")
        assert_unauthorized(await client.get("/orders", headers=bearer(no_kid)))
        swapped = jwt.encode(claims(tenant), pem_private(keys["a"]), "RS256", headers={"kid": "b"})
        assert_unauthorized(await client.get("/orders", headers=bearer(swapped)))


# --- configuration ------------------------------------------------------------------------


def test_header_mode_is_the_default() -> None:
    assert Settings().auth_mode == "header"


async def test_header_mode_ignores_bearer_tokens(client: httpx.AsyncClient, tenant: str) -> None:
    token = jwt.encode(claims(tenant), SECRET, algorithm="HS256")
    assert_unauthorized(await client.get("/orders", headers=bearer(token)))
    assert (await client.get("/orders", headers={"X-Tenant-Id": tenant})).status_code == 200


@pytest.mark.parametrize(
    "settings",
    [
        {"jwt_algorithm": "HS256"},
        {"jwt_algorithm": "RS256"},
        {"jwt_algorithm": "ES256", "jwt_public_key_file": ""},
    ],
)
def test_jwt_mode_without_a_key_refuses_to_start(settings: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="needs"):
        create_app(
            make_settings("postgresql://unused@127.0.0.1:1/unused", auth_mode="jwt", **settings)
        )
