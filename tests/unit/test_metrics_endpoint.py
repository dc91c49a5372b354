"""shared/metrics.py: a registry of its own per endpoint, and a port that cannot be had is a
configuration error naming the setting."""
from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry, Counter

from shared.errors import ConfigurationError
from shared.metrics import MetricsEndpoint
from tests.support.scrape import scrape


def test_each_endpoint_serves_its_own_registry_only():
    first, second = CollectorRegistry(), CollectorRegistry()
    Counter("cardline_test_events", "Test events.", registry=first).inc(3)
    a, b = MetricsEndpoint("127.0.0.1:0", first), MetricsEndpoint("127.0.0.1:0", second)
    try:
        assert scrape(a.address).value("cardline_test_events_total") == 3
        assert "cardline_test_events_total" not in scrape(b.address).names()
    finally:
        a.stop()
        b.stop()


def test_a_taken_port_is_a_configuration_error_naming_metrics_listen():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"metrics_listen 127.0.0.1:{port}: cannot listen"):
            MetricsEndpoint(f"127.0.0.1:{port}", CollectorRegistry())
