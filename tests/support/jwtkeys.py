"""Signing keys and JWTs made in-process, for tests of the mirror's Bearer auth.

Owns making an RSA key with a self-signed certificate (trusted through a PEM file,
or through an ``x5c`` chain issued by it) and an EC key published in a JWKS file
with a ``kid``, and minting tokens shaped like a registry token service's: ``iss``,
``sub``, ``aud``, ``exp``, ``nbf``, ``iat`` and an ``access`` list. The e2e tests
use ``tokenserver`` (openssl-signed, over HTTP) instead.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ISSUER = "corp-auth"
SERVICE = "mirrorproxy"


@dataclass(frozen=True, slots=True)
class Signer:
    """A private key, its certificate (RSA signers) and the ``kid`` it signs with."""

    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    cert: x509.Certificate | None
    alg: str
    kid: str | None = None

    def cert_pem(self) -> bytes:
        assert self.cert is not None
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def public_pem(self) -> bytes:
        return self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def rsa_signer(common_name: str = "test token signer", *, days: int = 30) -> Signer:
    """An RSA key with a self-signed CA certificate (RS256)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Signer(key, cert, "RS256")


def issued_signer(issuer: Signer, common_name: str = "leaf token signer") -> Signer:
    """An EC key whose certificate ``issuer`` signed (for x5c chains)."""
    assert issuer.cert is not None
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(issuer.key, hashes.SHA256())
    )
    return Signer(key, cert, "ES256")


def ec_signer(kid: str = "key-1") -> Signer:
    """An EC P-256 key (ES256) for a JWKS file."""
    return Signer(ec.generate_private_key(ec.SECP256R1()), None, "ES256", kid)


def write_jwks(path: Path, *signers: Signer) -> Path:
    """A JWKS file with each signer's public key under its ``kid``."""
    keys = []
    for s in signers:
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[s.alg].to_jwk(s.key.public_key()))
        keys.append({**jwk, "kid": s.kid, "use": "sig", "alg": s.alg})
    path.write_text(json.dumps({"keys": keys}))
    return path


def mint(
    signer: Signer,
    access: Sequence[Mapping[str, Any]],
    *,
    subject: str = "alice",
    issuer: str = ISSUER,
    audience: str = SERVICE,
    expires_in: int = 300,
    x5c: Sequence[Signer] = (),
    alg: str | None = None,
) -> str:
    """A signed token; ``x5c`` puts those signers' certificates in the header."""
    now = int(time.time())
    headers: dict[str, Any] = {}
    if signer.kid is not None:
        headers["kid"] = signer.kid
    if x5c:
        headers["x5c"] = [
            base64.b64encode(s.cert.public_bytes(serialization.Encoding.DER)).decode()
            for s in x5c
            if s.cert is not None
        ]
    claims = {
        "iss": issuer,
        "sub": subject,
        "aud": audience,
        "exp": now + expires_in,
        "nbf": now - 10,
        "iat": now,
        "jti": f"{now}-{subject}",
        "access": [dict(a) for a in access],
    }
    return jwt.encode(claims, signer.key, algorithm=alg or signer.alg, headers=headers)


def pull(*names: str) -> list[dict[str, Any]]:
    """An ``access`` claim granting pull on each repository name."""
    return [{"type": "repository", "name": n, "actions": ["pull"]} for n in names]
