"""Members from DNS: sorted URLs of the addresses, the last good list kept when a
lookup fails, and a warning when this member is not among them."""

from __future__ import annotations

import logging

import pytest

from mirrorproxy.config import ClusterConfig
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.upstream.members import Members


class Dns:
    """Answers lookups from a list a test changes; ``None`` makes a lookup fail."""

    def __init__(self) -> None:
        self.answer: list[str] | None = []
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if self.answer is None:
            raise OSError("Temporary failure in name resolution")
        return list(self.answer)


CLUSTER = ClusterConfig(
    self_url="http://10.0.0.2:5000", members_dns=("mirrors.svc.local", 5000), refresh=60.0
)


async def test_members_are_the_sorted_addresses_and_survive_a_failed_lookup(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns, metrics = Dns(), Metrics()
    members = Members(CLUSTER, metrics, resolver=dns)
    dns.answer = ["10.0.0.3", "10.0.0.2", "10.0.0.1", "10.0.0.3", "fd00::1"]
    await members.start()
    try:
        assert dns.asked == [("mirrors.svc.local", 5000)]
        want: tuple[str, ...] = (
            "http://10.0.0.1:5000",
            "http://10.0.0.2:5000",
            "http://10.0.0.3:5000",
            "http://[fd00::1]:5000",
        )
        assert members.current == want
        assert metrics.registry.get_sample_value("mirrorproxy_cluster_members") == 4

        dns.answer = None
        with caplog.at_level(logging.WARNING):
            await members.refresh()
        assert members.current == want
        assert "keeping 4 members" in caplog.text

        dns.answer = ["10.0.0.1"]
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            await members.refresh()
        assert members.current == ("http://10.0.0.1:5000",)
        assert "http://10.0.0.2:5000) is not among the members" in caplog.text
    finally:
        await members.close()


async def test_static_members_are_never_looked_up() -> None:
    dns = Dns()
    static = ClusterConfig(self_url="http://a:1", members=("http://a:1", "http://b:1"))
    members = Members(static, Metrics(), resolver=dns)
    await members.start()
    await members.refresh()
    await members.close()
    assert dns.asked == []
    assert members.current == ("http://a:1", "http://b:1")
