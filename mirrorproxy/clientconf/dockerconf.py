"""The ``registry-mirrors`` entry of Docker Engine's daemon.json, and what it cannot do.

dockerd consults mirrors for Docker Hub images only, and asks them without ``?ns=``,
so the mirror answers those requests from ``[server] default_namespace``. An http://
mirror needs no ``insecure-registries`` entry: dockerd dials a mirror with the scheme
its URL names, and that list only relaxes certificate checks for https hosts (Docker
20.10.24 pulled through ``http://10.9.9.9:5123``, outside its default insecure
127.0.0.0/8, with ``--registry-mirror`` alone). Pure.
"""

from __future__ import annotations

import json

from mirrorproxy.clientconf.registriesconf import mirror_host
from mirrorproxy.config import Config

DOCKER_HUB = "docker.io"
DAEMON_JSON = "/etc/docker/daemon.json"


def render_daemon_json(mirror_url: str) -> str:
    """Return the daemon.json fragment that makes dockerd try the mirror first.

    Raises:
        ValueError: the mirror URL has a path, which dockerd refuses for a mirror.
    """
    mirror_host(mirror_url)  # dockerd rejects a mirror URL with a path, as we do
    return json.dumps({"registry-mirrors": [mirror_url]}) + "\n"


def docker_notice(config: Config) -> tuple[str, bool]:
    """Return the line to print next to the fragment, and whether it is a warning.

    Docker's pulls land in ``default_namespace``; anything but docker.io there sends
    Docker Hub images to another registry's upstreams.
    """
    default = config.server.default_namespace
    scope = "Docker mirrors docker.io images only and sends no ns=, so its pulls use"
    if default == DOCKER_HUB:
        return (
            f"{scope} [server] default_namespace (docker.io); merge this into {DAEMON_JSON}",
            False,
        )
    if default is None:
        return (
            f"{scope} [server] default_namespace, which is not set: the mirror refuses "
            'them; set default_namespace = "docker.io"',
            True,
        )
    return (
        f"{scope} [server] default_namespace, which is {default!r}: Docker Hub images would "
        'be fetched from its upstreams; set default_namespace = "docker.io"',
        True,
    )
