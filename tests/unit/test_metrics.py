"""The metrics endpoint's pieces: its address, the Prometheus text, the config check."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, parse_config
from proxy.metrics import parse_listen, prometheus


def test_listen_addresses() -> None:
    assert parse_listen("127.0.0.1:9105") == ("127.0.0.1", 9105)
    assert parse_listen("[::1]:9105") == ("::1", 9105)
    for bad in ("9105", "host:", ":9105", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_a_bad_listen_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"metrics\.listen"):
        parse_config({"metrics": {"listen": "localhost"}})
    assert parse_config({"metrics": {"listen": "127.0.0.1:0"}}).metrics.listen == "127.0.0.1:0"
    assert parse_config({}).metrics.listen is None  # off unless asked for


def test_prometheus_text() -> None:
    lines = prometheus("x_total", "counter", "what it counts",
                       [({"lane": "c2s", "exit": "stored"}, 3), ({}, 1.5)])
    assert lines == ["# HELP x_total what it counts", "# TYPE x_total counter",
                     'x_total{lane="c2s",exit="stored"} 3', "x_total 1.5"]
