"""Load [storage] and [storage.s3], and the secrets that may come from a file or the
environment (shared with upstream passwords)."""

from __future__ import annotations

from urllib.parse import urlsplit

from mirrorproxy.config.model import S3Config, Secret, StorageConfig
from mirrorproxy.config.table import Table


def load_secret(t: Table, name: str) -> Secret | None:
    """One of ``name``, ``name``_file (first line) or ``name``_env."""
    keys = (name, f"{name}_file", f"{name}_env")
    given = [k for k in keys if k in t.data]
    if len(given) > 1:
        raise t.error(given[1], f"give only one of {', '.join(keys)}")
    if not given:
        return None
    key = given[0]
    if key == name:
        value = t.take(name, str, "")
    elif key == keys[1]:
        path = t.file(key)
        try:
            value = path.read_text().splitlines()[0] if path else ""
        except (OSError, IndexError, UnicodeDecodeError):
            raise t.error(key, f"cannot read a {name} from that file") from None
    else:
        var = t.take(key, str, "")
        if var not in t.environ:
            raise t.error(key, f"environment variable {var!r} is not set")
        value = t.environ[var]
    if not value:
        raise t.error(key, f"empty {name}")
    return Secret(value)


STORAGE_BACKENDS = ("filesystem", "s3")


def load_storage(t: Table) -> StorageConfig:
    backend = t.take("backend", str, "filesystem")
    if backend not in STORAGE_BACKENDS:
        raise t.error("backend", f"expected one of {', '.join(STORAGE_BACKENDS)}")
    s3_t = t.table("s3", required=backend == "s3")
    t.done()
    if backend != "s3":
        if s3_t.data:
            raise t.error("s3", 'only with backend = "s3"')
        return StorageConfig(backend)
    return StorageConfig(backend, _load_s3(s3_t))


def _load_s3(t: Table) -> S3Config:
    endpoint = t.take("endpoint", str, "")
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise t.error("endpoint", "expected http(s)://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.username is not None:
        raise t.error("endpoint", "expected http(s)://host[:port] with no path or credentials")
    bucket = t.take("bucket", str, "")
    if not bucket:
        raise t.error("bucket", "missing")
    prefix = t.take("prefix", str, "")
    if prefix.startswith("/"):
        raise t.error("prefix", "must not start with '/'")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    # Not a secret, but Kubernetes keeps it in the same Secret as the secret key.
    access = load_secret(t, "access_key")
    access_key = access.reveal() if access is not None else None
    secret = load_secret(t, "secret_key")
    if (access_key is None) != (secret is None):
        raise t.error(
            "access_key" if access_key is None else "secret_key",
            "give both access_key and a secret_key",
        )
    out = S3Config(
        endpoint=endpoint.rstrip("/"),
        bucket=bucket,
        region=t.take("region", str, "us-east-1") or "us-east-1",
        prefix=prefix,
        access_key=access_key,
        secret_key=secret,
        redirect=t.take("redirect", bool, False),
    )
    t.done()
    return out
