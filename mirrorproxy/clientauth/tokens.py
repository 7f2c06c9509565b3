"""Bearer tokens: verify JWTs issued by an existing token service.

Owns the trusted keys (a PEM file of certificates and/or public keys, or a JWKS
file) and checking one token the way the reference registry's ``auth: token`` does:
an asymmetric signature by a trusted key (found by the header's ``kid``, by an
``x5c`` chain that ends at a trusted certificate, or by trying each trusted key),
the configured issuer and service (``aud``), an expiry, and the ``access`` claim,
whose ``repository`` entries with ``pull`` become the names the token may pull.
What a name is (``<ns>/<repo>``) and what follows from it is ``policy``'s business.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.ed448 import Ed448PublicKey
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

logger = logging.getLogger(__name__)

# Asymmetric algorithms only: an HMAC "signature" would be made with a public key.
ALGORITHMS = (
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
    "EdDSA",
)
MAX_CHAIN = 5  # certificates in an x5c header
PublicKey = RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey


class InvalidToken(Exception):
    """A token that proves nothing; the message says why (never the token)."""


@dataclass(frozen=True, slots=True)
class TrustedKeys:
    keys: tuple[PublicKey, ...]  # every trusted key, tried in order without a kid
    by_kid: Mapping[str, PublicKey]  # from a JWKS file
    certs: tuple[x509.Certificate, ...]  # roots an x5c chain may end at


@dataclass(frozen=True, slots=True)
class TokenClaims:
    subject: str  # ``sub``: who the token service issued it to
    pulls: frozenset[str]  # repository names the token may pull
    expires: float  # ``exp``, seconds since the epoch


def load_keys(path: Path) -> TrustedKeys:
    """Read a PEM file (certificates and public keys) or a JWKS (JSON) file.

    Raises:
        ValueError: unreadable, or no usable key in it.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err.strerror}") from None
    if data.lstrip().startswith(b"{"):
        return _load_jwks(data)
    return _load_pem(data)


def _load_pem(data: bytes) -> TrustedKeys:
    keys: list[PublicKey] = []
    certs: list[x509.Certificate] = []
    blocks = data.split(b"-----BEGIN ")[1:]
    for block in blocks:
        pem = b"-----BEGIN " + block
        kind = block.split(b"-----", 1)[0]
        try:
            if kind == b"CERTIFICATE":
                cert = x509.load_pem_x509_certificate(pem)
                certs.append(cert)
                keys.append(_usable(cert.public_key()))
            elif kind == b"PUBLIC KEY":
                keys.append(_usable(serialization.load_pem_public_key(pem)))
            else:
                raise ValueError(f"a {kind.decode(errors='replace')[:40]} block")
        except ValueError as err:
            raise ValueError(f"not a certificate or public key: {err}") from None
    if not keys:
        raise ValueError("no PEM certificate or public key found (nor a JWKS)")
    return TrustedKeys(tuple(keys), {}, tuple(certs))


def _load_jwks(data: bytes) -> TrustedKeys:
    try:
        jwks = jwt.PyJWKSet.from_json(data.decode("utf-8"))
    except (jwt.PyJWTError, ValueError, UnicodeDecodeError) as err:
        raise ValueError(f"not a usable JWKS: {err}") from None
    keys: list[PublicKey] = []
    by_kid: dict[str, PublicKey] = {}
    for jwk in jwks.keys:
        key = _usable(jwk.key)
        keys.append(key)
        if jwk.key_id:
            by_kid[jwk.key_id] = key
    return TrustedKeys(tuple(keys), by_kid, ())


def _usable(key: object) -> PublicKey:
    """The key if it can verify an asymmetric signature (not a private or HMAC key)."""
    if isinstance(key, RSAPublicKey | EllipticCurvePublicKey | Ed25519PublicKey | Ed448PublicKey):
        return key
    raise ValueError(f"unsupported key type {type(key).__name__}")


class TokenVerifier:
    """Check Bearer tokens against the trusted keys, issuer and service."""

    def __init__(
        self,
        keys: TrustedKeys,
        *,
        issuer: str,
        service: str,
        leeway: float,
        clock: Callable[[], float],
    ) -> None:
        self._keys = keys
        self._issuer = issuer
        self._service = service
        self._leeway = leeway
        self._clock = clock

    def verify(self, token: str) -> TokenClaims:
        """The token's subject and pull grants.

        Raises:
            InvalidToken: bad signature, untrusted key, wrong issuer or service,
                expired or not yet valid, malformed.
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise InvalidToken(f"malformed token ({err})") from None
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise InvalidToken(f"algorithm {str(alg)[:20]!r} is not accepted")
        claims: dict[str, Any] | None = None
        last: Exception | None = None
        for key in self._candidates(header):
            try:
                claims = jwt.decode(
                    token,
                    key=key,
                    algorithms=[alg],
                    audience=self._service,
                    issuer=self._issuer,
                    leeway=self._leeway,
                    options={"require": ["exp", "iss", "aud"], "verify_iat": False},
                )
                break
            except jwt.InvalidSignatureError as err:
                last = err  # another trusted key may have signed it
            except (jwt.PyJWTError, ValueError, TypeError) as err:
                raise InvalidToken(f"token refused: {err}") from None
        if claims is None:
            raise InvalidToken(f"no trusted key signed this token ({last})")
        return TokenClaims(
            subject=str(claims.get("sub") or ""),
            pulls=_pulls(claims.get("access")),
            expires=float(claims["exp"]),
        )

    def _candidates(self, header: Mapping[str, Any]) -> Sequence[PublicKey]:
        chain = header.get("x5c")
        if chain is not None:
            return [self._chain_key(chain)]
        kid = header.get("kid")
        if isinstance(kid, str) and kid in self._keys.by_kid:
            return [self._keys.by_kid[kid]]
        return self._keys.keys

    def _chain_key(self, chain: object) -> PublicKey:
        """The leaf's key, if the chain is valid now and reaches a trusted certificate."""
        if not isinstance(chain, list) or not 0 < len(chain) <= MAX_CHAIN:
            raise InvalidToken("malformed x5c header")
        try:
            certs = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in chain]
        except (ValueError, TypeError, binascii.Error):
            raise InvalidToken("malformed x5c certificate") from None
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        for cert in certs:
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise InvalidToken("an x5c certificate is expired or not yet valid")
        for i, cert in enumerate(certs):
            if i > 0 and not _issued_by(certs[i - 1], cert):
                raise InvalidToken("the x5c chain is broken")
            roots = self._keys.certs
            if cert in roots or any(_issued_by(cert, root) for root in roots):
                return _usable_or_invalid(certs[0].public_key())
        raise InvalidToken("the x5c chain does not reach a trusted certificate")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def _usable_or_invalid(key: object) -> PublicKey:
    try:
        return _usable(key)
    except ValueError as err:
        raise InvalidToken(str(err)) from None


def _pulls(access: object) -> frozenset[str]:
    """Repository names an ``access`` claim grants ``pull`` (or ``*``) on."""
    if not isinstance(access, list):
        return frozenset()
    names = set()
    for entry in access:
        if not isinstance(entry, dict) or entry.get("type") != "repository":
            continue
        name, actions = entry.get("name"), entry.get("actions")
        if not isinstance(name, str) or not isinstance(actions, list):
            continue
        if any(a in ("pull", "*") for a in actions):
            names.add(name)
    return frozenset(names)
