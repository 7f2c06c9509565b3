"""containerd with its CRI plugin, and the few CRI calls a kubelet makes to pull.

Owns starting a private containerd whose CRI plugin reads ``config_path`` (the
hosts.toml directory) the way a Kubernetes node's does, and a client for
``runtime.v1.ImageService/PullImage`` with an optional ``AuthConfig`` (what the
kubelet sends from an ``imagePullSecret``). The messages are encoded by hand (a
few protobuf string fields), so only grpcio is needed, not generated code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from tests.support.procs import CTR_ENV_OVERRIDES, Containerd, free_port

PULL_IMAGE = "/runtime.v1.ImageService/PullImage"
REMOVE_IMAGE = "/runtime.v1.ImageService/RemoveImage"
CALL_TIMEOUT = 120.0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (strings and embedded messages)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _fields(values: Sequence[tuple[int, str | bytes | None]]) -> bytes:
    out = b""
    for number, value in values:
        if value:
            out += _field(number, value.encode() if isinstance(value, str) else value)
    return out


@dataclass(frozen=True, slots=True)
class AuthConfig:
    """CRI ``AuthConfig``: what the kubelet passes from a pull secret."""

    username: str = ""
    password: str = ""
    auth: str = ""  # base64 of user:password
    server_address: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def encode(self) -> bytes:
        return _fields(
            [
                (1, self.username),
                (2, self.password),
                (3, self.auth),
                (4, self.server_address),
                (5, self.identity_token),
                (6, self.registry_token),
            ]
        )


def pull_image_request(image: str, auth: AuthConfig | None = None) -> bytes:
    """``PullImageRequest{image: ImageSpec{image}, auth}``."""
    spec = _fields([(1, image)])
    return _fields([(1, spec), (2, auth.encode() if auth else None)])


def _read_string_field(data: bytes, wanted: int) -> str:
    """The first length-delimited field ``wanted`` of a message (enough for replies)."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length, pos = _read_varint(data, pos)
            if number == wanted:
                return data[pos : pos + length].decode()
            pos += length
        elif wire == 0:
            _, pos = _read_varint(data, pos)
        else:
            raise ValueError(f"unexpected wire type {wire}")
    return ""


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def _identity(data: bytes) -> bytes:
    return data


class CriClient:
    """The image calls of the CRI API over containerd's socket."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(f"unix://{address}")
        self._pull = self._channel.unary_unary(
            PULL_IMAGE, request_serializer=_identity, response_deserializer=_identity
        )
        self._remove = self._channel.unary_unary(
            REMOVE_IMAGE, request_serializer=_identity, response_deserializer=_identity
        )

    def pull_image(self, image: str, auth: AuthConfig | None = None) -> str:
        """Pull like the kubelet; return the image id (``sha256:...``).

        Raises:
            grpc.RpcError: the pull failed (its ``details()`` says why).
        """
        reply = self._pull(pull_image_request(image, auth), timeout=CALL_TIMEOUT)
        return _read_string_field(reply, 1)

    def remove_image(self, image: str) -> None:
        self._remove(_fields([(1, _fields([(1, image)]))]), timeout=CALL_TIMEOUT)

    def close(self) -> None:
        self._channel.close()


class CriContainerd(Containerd):
    """A private containerd with the CRI plugin on, reading hosts.toml from ``hosts_dir``.

    ``registry_configs`` adds ``[...cri.registry.configs."HOST".auth]`` tables
    (username/password per host), the way k3s writes ``registries.yaml`` configs.
    The daemon fetches under CRI, so it gets the dead-proxy environment that makes a
    fallback to a real registry fail at once.
    """

    def __init__(
        self,
        hosts_dir: Path,
        *,
        registry_configs: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        self.hosts_dir = hosts_dir
        self.registry_configs = dict(registry_configs or {})
        super().__init__(disable_cri=False, extra_config="", start=False)
        scratch = self.dir / "cni"
        cri = '[plugins."io.containerd.grpc.v1.cri"]'
        lines = [
            "[ttrpc]",
            f"  address = {json.dumps(str(self.dir / 'ttrpc.sock'))}",
            cri,
            '  stream_server_address = "127.0.0.1"',
            f'  stream_server_port = "{free_port()}"',
            f"{cri[:-1]}.cni]",
            f"  bin_dir = {json.dumps(str(scratch / 'bin'))}",
            f"  conf_dir = {json.dumps(str(scratch / 'conf'))}",
            f"{cri[:-1]}.registry]",
            f"  config_path = {json.dumps(str(hosts_dir))}",
        ]
        for host, auth in self.registry_configs.items():
            lines.append(f"{cri[:-1]}.registry.configs.{json.dumps(host)}.auth]")
            lines += [f"  {k} = {json.dumps(v)}" for k, v in auth.items()]
        with self.config_path.open("a") as f:
            f.write("\n".join(lines) + "\n")
        self.start()

    def _spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        super()._spawn(argv, env=dict(env or os.environ) | CTR_ENV_OVERRIDES)

    def client(self) -> CriClient:
        return CriClient(self.address)
