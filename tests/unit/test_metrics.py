"""The metrics endpoint's pieces: its address, the Prometheus text, the config check, the
counters and the histogram."""

from __future__ import annotations

import time

import pytest

from proxy.config import ConfigError, parse_config
from proxy.metrics import Counters, Histogram, parse_listen, prometheus
from proxy.xmpp import ns


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
    # Counters stay exact past a million; label values are escaped.
    big = prometheus("y_total", "counter", "h", [({"rule": 'say "hi"\\'}, 12_345_678)])
    assert big[-1] == 'y_total{rule="say \\"hi\\"\\\\"} 12345678'


def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    h = Histogram((0.001, 0.01, 0.1))
    for value in (0.0005, 0.001, 0.002, 0.05, 3.0):
        h.observe(value)
    lines = h.lines("t_seconds", "time")
    assert lines[1] == "# TYPE t_seconds histogram"
    assert lines[2:] == ['t_seconds_bucket{le="0.001"} 2', 't_seconds_bucket{le="0.01"} 3',
                         't_seconds_bucket{le="0.1"} 4', 't_seconds_bucket{le="+Inf"} 5',
                         "t_seconds_sum 3.053500", "t_seconds_count 5"]


def test_counters_group_tags_into_kinds_and_list_every_listener_kind() -> None:
    c = Counters()
    message, iq = ns.qname(ns.CLIENT, "message"), ns.qname(ns.CLIENT, "iq")
    for _ in range(3):
        c.relayed(c.c2s_stanzas, message, time.perf_counter())
    c.relayed(c.s2c_stanzas, iq, time.perf_counter() - 0.3)
    c.s2c_bytes.update({message: 120, ns.qname(ns.SM, "a"): 30, ns.qname(ns.SM, "r"): 10})
    c.count(c.logins, "ok")
    c.count(c.logins, "not-authorized")
    c.count(c.logins, "ok")
    c.count(c.tls_handshakes, ("starttls", "failed"))
    text = "\n".join(c.lines())
    assert 'xmpp_front_stanzas_total{direction="c2s",kind="message"} 3' in text
    assert 'xmpp_front_stanzas_total{direction="s2c",kind="iq"} 1' in text
    assert 'xmpp_front_stanzas_total{direction="s2c",kind="presence"} 0' in text
    assert 'xmpp_front_stanza_bytes_total{direction="s2c",kind="message"} 120' in text
    assert 'xmpp_front_stanza_bytes_total{direction="s2c",kind="other"} 40' in text
    assert 'xmpp_front_logins_total{result="ok"} 2' in text
    assert 'xmpp_front_logins_total{result="not-authorized"} 1' in text
    assert 'xmpp_front_tls_handshakes_total{listener="starttls",result="failed"} 1' in text
    assert 'xmpp_front_tls_handshakes_total{listener="direct_tls",result="ok"} 0' in text
    assert 'xmpp_front_relay_seconds_count 4' in text
    assert 'xmpp_front_relay_seconds_bucket{le="0.25"} 3' in text  # the slow one is above
    assert 'xmpp_front_relay_seconds_bucket{le="0.5"} 4' in text
    assert "xmpp_front_proxy_headers_total" not in text  # no listener asks for them


def test_proxy_protocol_listener_options_are_checked() -> None:
    config = parse_config({"listen": [{"port": 5222, "proxy_protocol": True,
                                       "proxy_protocol_from": ["10.0.0.0/8", "::1"]}]})
    assert config.listen[0].proxy_protocol
    with pytest.raises(ConfigError, match=r"proxy_protocol_from"):
        parse_config({"listen": [{"proxy_protocol": True, "proxy_protocol_from": ["lb"]}]})
    with pytest.raises(ConfigError, match=r"limits\.proxy_header_timeout"):
        parse_config({"limits": {"proxy_header_timeout": 0}})
