"""A minimal CRI image client over gRPC, and containerd started with its CRI plugin on.

Kubernetes pulls through containerd's CRI plugin (``runtime.v1.ImageService``), the
only path that reads ``config_path`` from config.toml; ``ctr`` never does. The tests
speak that API themselves, the way kubelet does.

Why hand-written protobuf: three calls use five messages and a handful of fields
(kubernetes cri-api ``pkg/apis/runtime/v1/api.proto``: ``ImageSpec.image = 1``;
``PullImageRequest.image = 1``, ``PullImageResponse.image_ref = 1``;
``ImageStatusRequest.image = 1``, ``ImageStatusResponse.image = 1``; ``Image.id = 1``,
``repo_tags = 2``, ``repo_digests = 3``, ``size = 4``; ``RemoveImageRequest.image = 1``).
Encoding those by hand is ~40 lines with no code generator, no generated module to
keep in step or exempt from mypy, and grpcio as the only dependency; unknown
fields in answers are skipped, as protobuf requires.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from tests.support.procs import CTR_ENV_OVERRIDES, Containerd, free_port

SERVICE = "/runtime.v1.ImageService/"
CALL_TIMEOUT = 120.0


def _varint(value: int) -> bytes:
    """Encode a non-negative int as a protobuf varint."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_bytes(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): strings and nested messages."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def parse_fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Decode one message into field number -> values (bytes for type 2, int else).

    Raises:
        ValueError: truncated data or a wire type protobuf 3 does not use.
    """
    fields: dict[int, list[bytes | int]] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data):
                raise ValueError("truncated varint")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        value: bytes | int
        if wire == 0:
            value = varint()
        elif wire == 2:
            length = varint()
            if pos + length > len(data):
                raise ValueError("truncated field")
            value = data[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value = int.from_bytes(data[pos : pos + size], "little")
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _strings(fields: Mapping[int, Sequence[bytes | int]], number: int) -> list[str]:
    return [v.decode() for v in fields.get(number, []) if isinstance(v, bytes)]


def _image_spec(image: str) -> bytes:
    return field_bytes(1, field_bytes(1, image.encode()))  # <Request>.image = ImageSpec{image}


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """CRI ``AuthConfig`` (``PullImageRequest.auth = 2``): what the kubelet sends from
    an imagePullSecret (``username = 1``, ``password = 2``, ``auth = 3``,
    ``server_address = 4``, ``identity_token = 5``, ``registry_token = 6``)."""

    username: str = ""
    password: str = ""
    auth: str = ""  # base64 of user:password
    server_address: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def encode(self) -> bytes:
        values = (
            self.username,
            self.password,
            self.auth,
            self.server_address,
            self.identity_token,
            self.registry_token,
        )
        return b"".join(
            field_bytes(number, value.encode())
            for number, value in enumerate(values, start=1)
            if value
        )


def rpc_error_text(err: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call (grpcio raises objects that are also Calls)."""
    code, details = getattr(err, "code", None), getattr(err, "details", None)
    if callable(code) and callable(details):
        return f"{code()}: {details()}"
    return str(err)


@dataclass(frozen=True, slots=True)
class CriImage:
    """What ``ImageStatus`` says about an image."""

    id: str  # the config digest
    repo_tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    size: int


class CriImageClient:
    """``runtime.v1.ImageService`` on a containerd socket: pull, status, remove."""

    def __init__(self, socket_path: str, *, timeout: float = CALL_TIMEOUT) -> None:
        self._channel = grpc.insecure_channel(f"unix://{socket_path}")
        self._timeout = timeout

    def _call(self, method: str, request: bytes) -> bytes:
        # No serializers: grpcio then sends and returns raw message bytes.
        rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            SERVICE + method
        )
        answer: bytes = rpc(request, timeout=self._timeout)
        return answer

    def pull(self, image: str, auth: AuthConfig | None = None) -> str:
        """PullImage (with ``auth`` as a pull secret gives it); return ``image_ref``
        (containerd: the config digest).

        Raises:
            grpc.RpcError: the pull failed (``details()`` says why).
        """
        request = _image_spec(image)
        if auth is not None:
            request += field_bytes(2, auth.encode())
        fields = parse_fields(self._call("PullImage", request))
        refs = _strings(fields, 1)
        return refs[0] if refs else ""

    def status(self, image: str) -> CriImage | None:
        """ImageStatus; None when the runtime does not have the image."""
        fields = parse_fields(self._call("ImageStatus", _image_spec(image)))
        nested = [v for v in fields.get(1, []) if isinstance(v, bytes)]
        if not nested:
            return None
        img = parse_fields(nested[0])
        sizes = [v for v in img.get(4, []) if isinstance(v, int)]
        return CriImage(
            id=next(iter(_strings(img, 1)), ""),
            repo_tags=tuple(_strings(img, 2)),
            repo_digests=tuple(_strings(img, 3)),
            size=sizes[0] if sizes else 0,
        )

    def remove(self, image: str) -> None:
        """RemoveImage (idempotent, as the CRI requires)."""
        self._call("RemoveImage", _image_spec(image))

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class CriContainerd(Containerd):
    """containerd with the CRI plugin on, registry hosts from ``hosts_dir``.

    Under CRI the daemon itself fetches, so the daemon gets the closed local proxy:
    a fallback to a real registry fails at once instead of leaving the machine.
    Everything else (ttrpc socket, CNI dirs, the stream server) stays in a scratch
    directory or on loopback. ``registry_auth`` adds
    ``[...cri.registry.configs."HOST".auth]`` tables (``username``/``password`` per
    host), which is what k3s writes for ``registries.yaml`` ``configs``.
    """

    def __init__(
        self, hosts_dir: Path, *, registry_auth: Mapping[str, Mapping[str, str]] | None = None
    ) -> None:
        self.scratch = Path(tempfile.mkdtemp(prefix="cri", dir="/tmp"))
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        extra = "\n".join(
            [
                "[ttrpc]",
                f"  address = {json.dumps(str(self.scratch / 'ttrpc.sock'))}",
                cri,
                '  stream_server_address = "127.0.0.1"',
                f'  stream_server_port = "{free_port()}"',
                f"{cri[:-1]}.cni]",
                f"  bin_dir = {json.dumps(str(self.scratch / 'cni-bin'))}",
                f"  conf_dir = {json.dumps(str(self.scratch / 'cni-conf'))}",
                f"{cri[:-1]}.registry]",
                f"  config_path = {json.dumps(str(hosts_dir))}",
                *(
                    line
                    for host, auth in (registry_auth or {}).items()
                    for line in (
                        f"{cri[:-1]}.registry.configs.{json.dumps(host)}.auth]",
                        *(f"  {k} = {json.dumps(v)}" for k, v in auth.items()),
                    )
                ),
                "",
            ]
        )
        try:
            super().__init__(disable_cri=False, extra_config="\n" + extra)
        except BaseException:
            shutil.rmtree(self.scratch, ignore_errors=True)
            raise

    def _spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        super()._spawn(argv, env=dict(env if env is not None else os.environ) | CTR_ENV_OVERRIDES)

    def cleanup(self) -> None:
        """Stop the daemon; remove its directory and the scratch directory."""
        super().cleanup()
        shutil.rmtree(self.scratch, ignore_errors=True)
