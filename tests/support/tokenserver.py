"""A small Docker Registry token server for docker-registry's ``auth: token``.

Owns answering ``GET /token?service=...&scope=...`` on 127.0.0.1 with RS256 JWTs that
docker-registry 2.8 accepts: the header's ``x5c`` carries the signing certificate,
which the registry checks against its ``rootcertbundle``; the claims carry
``iss``/``aud``/``exp``/``nbf``/``iat``/``jti`` and the granted ``access``. Users
authenticate with Basic; every request is recorded so tests can see who asked for
what. It runs ``http.server`` in a daemon thread (over TLS when given a server
certificate) and signs with ``openssl``.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import ssl
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self

from tests.support.tls import CertKey, rs256_sign

ALL_ACTIONS = ("pull", "push")


def b64url(data: bytes) -> str:
    """Base64url without padding, as JWS uses it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def parse_scope(scope: str) -> dict[str, Any] | None:
    """``repository:library/app:pull,push`` -> an access entry (None if malformed)."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not sep or not sep2 or not kind or not name:
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


@dataclass(frozen=True, slots=True)
class TokenRequest:
    """One request the token server saw."""

    user: str | None  # from Basic auth; None when anonymous
    authorized: bool  # whether the credentials were right (anonymous: True)
    service: str
    scopes: tuple[str, ...]
    status: int
    raw_authorization: str | None  # the header exactly as received (tests check secrecy)
    token: str | None  # what was issued, if anything


class TokenServer:
    """Issue registry tokens on ``http://127.0.0.1:PORT/token``.

    Args:
        signer: certificate and RSA key that sign tokens (the registry's root bundle).
        service: the ``aud`` the registry expects (its ``auth.token.service``).
        issuer: the ``iss`` the registry expects (its ``auth.token.issuer``).
        users: user -> password accepted with Basic auth.
        anonymous_actions: actions granted without credentials (none by default:
            an anonymous token then carries an empty ``access`` list).
        expires_in: token lifetime in seconds.
        tls: a server certificate for 127.0.0.1: serve the realm over https.
    """

    def __init__(
        self,
        signer: CertKey,
        *,
        service: str = "test-registry",
        issuer: str = "test-issuer",
        users: Mapping[str, str] | None = None,
        anonymous_actions: Sequence[str] = (),
        expires_in: int = 300,
        tls: CertKey | None = None,
    ) -> None:
        self.signer = signer
        self.service = service
        self.issuer = issuer
        self.users = dict(users or {})
        self.anonymous_actions = tuple(anonymous_actions)
        self.expires_in = expires_in
        self._x5c = [signer.der_b64()]
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls.cert, tls.key)
            self._httpd.socket = ctx.wrap_socket(self._httpd.socket, server_side=True)
            self.scheme = "https"
        self.port: int = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="token-server", daemon=True
        )
        self._thread.start()

    @property
    def realm(self) -> str:
        """The URL for the registry's ``auth.token.realm``."""
        return f"{self.scheme}://127.0.0.1:{self.port}/token"

    def requests(self) -> list[TokenRequest]:
        """Every token request so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def mint(self, access: Sequence[Mapping[str, Any]], *, subject: str = "test") -> str:
        """Sign a token granting ``access`` (for the test's own pushes)."""
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": self._x5c}
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": [dict(a) for a in access],
        }
        signing_input = (
            b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        signature = rs256_sign(self.signer.key, signing_input.encode("ascii"))
        return signing_input + "." + b64url(signature)

    def push_token(self, repo: str) -> str:
        """A token with pull and push on ``repo``, as ``images.push`` needs."""
        return self.mint(
            [{"type": "repository", "name": repo, "actions": list(ALL_ACTIONS)}], subject="pusher"
        )

    def _check(self, authorization: str | None) -> tuple[str | None, bool]:
        """(user, credentials-valid) for an Authorization header."""
        if authorization is None:
            return None, True
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, False
        ok = (
            bool(sep) and user in self.users and secrets.compare_digest(self.users[user], password)
        )
        return user, ok

    def _answer(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        """Handle one GET: the status and the JSON body to send."""
        url = urllib.parse.urlsplit(path)
        if url.path != "/token":
            return 404, {"error": "not found"}
        query = urllib.parse.parse_qs(url.query)
        service = (query.get("service") or [""])[0]
        scopes = tuple(query.get("scope", []))
        user, ok = self._check(authorization)
        status = 200
        if not ok:
            status = 401
        elif service != self.service:
            status = 400
        if status != 200:
            self._record(TokenRequest(user, ok, service, scopes, status, authorization, None))
            return status, {"errors": [{"code": "UNAUTHORIZED", "message": "denied"}]}
        allowed = ALL_ACTIONS if user is not None else self.anonymous_actions
        access = []
        for scope in scopes:
            entry = parse_scope(scope)
            if entry is not None:
                entry["actions"] = [a for a in entry["actions"] if a in allowed]
                access.append(entry)
        token = self.mint(access, subject=user or "anonymous")
        self._record(TokenRequest(user, ok, service, scopes, status, authorization, token))
        return 200, {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def _record(self, req: TokenRequest) -> None:
        with self._lock:
            self._requests.append(req)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                status, body = server._answer(self.path, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="token"')
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                # No OAuth2 form grant here: 405 sends containerd (which tries a POST
                # first when it has credentials) to the GET flow, as its docs describe.
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(405)
                self.send_header("Allow", "GET")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # requests() is the record; keep pytest output clean

        return Handler

    def close(self) -> None:
        """Stop serving and join the thread (bounded)."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
