"""Test PKI and credentials made on the spot with openssl and htpasswd.

Owns a private CA, server certificates for ``127.0.0.1``, a self-signed token-signing
certificate, RS256 signatures and bcrypt htpasswd lines, all written to a temporary
directory. Everything goes through the ``openssl`` and ``htpasswd`` command-line
tools (Debian's ``openssl`` and ``apache2-utils``), so the tests need no Python
crypto package. Keys are for tests only and never leave their directory.
"""

from __future__ import annotations

import base64
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

#: Tools these helpers run, with the Debian package that provides each.
TLS_BINARIES = {"openssl": "openssl", "htpasswd": "apache2-utils"}

TOOL_TIMEOUT = 30.0


def missing_tls_tools() -> list[str]:
    """Return one reason per missing tool (empty when all are on PATH)."""
    return [
        f"`{tool}` not found on PATH (apt-get install {package})"
        for tool, package in TLS_BINARIES.items()
        if shutil.which(tool) is None
    ]


def _run(argv: list[str], *, stdin: bytes | None = None) -> bytes:
    """Run a tool, return its stdout; raise with its stderr on failure."""
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, timeout=TOOL_TIMEOUT, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode(errors='replace')}"
        )
    return proc.stdout


@dataclass(frozen=True, slots=True)
class CertKey:
    """A PEM certificate and its PEM private key."""

    cert: Path
    key: Path

    def der_b64(self) -> str:
        """The certificate as standard base64 DER, as a JWS ``x5c`` entry holds it."""
        pem = self.cert.read_text()
        body = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END", 1)[0]
        der = base64.b64decode("".join(body.split()))
        return base64.b64encode(der).decode("ascii")

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this certificate as a CA (for test clients)."""
        return ssl.create_default_context(cafile=str(self.cert))


def make_ca(directory: Path, name: str = "mirrorproxy test CA") -> CertKey:
    """Create a self-signed CA (EC P-256, valid one day) in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = CertKey(directory / "ca.pem", directory / "ca.key")
    _run(
        [
            "openssl", "req", "-x509", "-new", "-nodes",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(ca.key), "-out", str(ca.cert),
            "-days", "1", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        ]
    )  # fmt: skip
    return ca


def issue_server_cert(
    ca: CertKey, directory: Path, *, ip: str = "127.0.0.1", dns: str | None = None
) -> CertKey:
    """Create a server certificate for ``ip`` (subjectAltName=IP:...), or for the host
    name ``dns`` only (subjectAltName=DNS:...), signed by ``ca``."""
    directory.mkdir(parents=True, exist_ok=True)
    out = CertKey(directory / "server.pem", directory / "server.key")
    csr = directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName={f'DNS:{dns}' if dns else f'IP:{ip}'}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _run(
        [
            "openssl", "req", "-new", "-nodes",
            "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-keyout", str(out.key), "-out", str(csr), "-subj", f"/CN={dns or ip}",
        ]
    )  # fmt: skip
    _run(
        [
            "openssl", "x509", "-req", "-in", str(csr),
            "-CA", str(ca.cert), "-CAkey", str(ca.key), "-CAcreateserial",
            "-out", str(out.cert), "-days", "1", "-extfile", str(ext),
        ]
    )  # fmt: skip
    return out


def make_signing_cert(directory: Path, name: str = "test token signer") -> CertKey:
    """Create a self-signed RSA certificate whose key signs RS256 tokens.

    The certificate goes into the registry's ``rootcertbundle`` and into each
    token's ``x5c`` header; docker-registry trusts a chain ending in that bundle.
    """
    directory.mkdir(parents=True, exist_ok=True)
    out = CertKey(directory / "signer.pem", directory / "signer.key")
    _run(
        [
            "openssl", "req", "-x509", "-new", "-nodes", "-newkey", "rsa:2048",
            "-keyout", str(out.key), "-out", str(out.cert),
            "-days", "1", "-subj", f"/CN={name}",
        ]
    )  # fmt: skip
    return out


def rs256_sign(key: Path, data: bytes) -> bytes:
    """RSASSA-PKCS1-v1_5 with SHA-256 over ``data``: a JWS RS256 signature."""
    return _run(["openssl", "dgst", "-sha256", "-sign", str(key)], stdin=data)


def htpasswd_line(user: str, password: str) -> str:
    """One bcrypt ``user:hash`` line, the only kind docker-registry accepts.

    The password goes to htpasswd on stdin (``-i``), never on a command line.
    """
    out = _run(["htpasswd", "-niB", "-C", "5", user], stdin=password.encode() + b"\n")
    return out.decode().strip()
