"""What a reload takes on (proxy/reload.py) and the log level a reload can change."""

from __future__ import annotations

import io
import json
from typing import Any

from proxy.config import parse_config
from proxy.logsetup import get_logger, setup_logging
from proxy.reload import changed_keys, plan_reload
from tests.integration.proxyproc import merge_config

BASE: dict[str, Any] = {"listen": [{"host": "127.0.0.1", "port": 5222}],
        "limits": {"max_stanza_bytes": 65536}, "log": {"level": "info"}}


def with_(extra: dict[str, Any]) -> dict[str, Any]:
    return merge_config(BASE, extra)


def test_no_change_no_keys() -> None:
    plan = plan_reload(parse_config(BASE), parse_config(BASE))
    assert plan.changed == [] and plan.config == parse_config(BASE)


def test_changed_keys_are_dotted_and_a_list_is_one_value() -> None:
    old = parse_config(BASE)
    new = parse_config(with_({"limits": {"max_stanza_bytes": 4096},
                              "listen": [{"host": "127.0.0.1", "port": 5333}],
                              "log": {"redact": ["body", "subject"]}}))
    assert changed_keys(old, new) == ["listen", "limits.max_stanza_bytes", "log.redact"]


def test_what_needs_a_restart_keeps_its_old_value_the_rest_is_taken_on() -> None:
    old = parse_config(BASE)
    new = parse_config(with_({
        "limits": {"max_stanza_bytes": 4096}, "log": {"level": "debug", "format": "console"},
        "listen": [{"host": "127.0.0.1", "port": 5333}],
        "upstream": {"domain": "example.org", "host": "10.0.0.2"},
        "store": {"path": "elsewhere.sqlite3"}, "durability": {"mode": "memory"},
        "metrics": {"listen": "127.0.0.1:9105"}, "abuse": {"max_sessions_per_account": 3},
        "stream_management": {"resume_timeout": 60}}))
    plan = plan_reload(old, new)
    assert plan.applied == ["upstream.host", "limits.max_stanza_bytes",
                            "abuse.max_sessions_per_account", "log.level",
                            "stream_management.resume_timeout"]
    assert plan.needs_restart == ["listen", "upstream.domain", "log.format", "store.path",
                                  "durability.mode", "metrics.listen"]
    config = plan.config
    assert config.limits.max_stanza_bytes == 4096 and config.upstream.host == "10.0.0.2"
    assert config.abuse.max_sessions_per_account == 3 and config.log.level == "debug"
    assert config.stream_management.resume_timeout == 60
    # Still what runs: the old values.
    assert config.listen == old.listen and config.upstream.domain == old.upstream.domain
    assert config.log.format == old.log.format and config.store == old.store
    assert config.durability == old.durability and config.metrics == old.metrics


def test_a_logger_bound_before_the_change_follows_the_new_level() -> None:
    out = io.StringIO()
    level = setup_logging(parse_config(BASE).log, stream=out)
    log = get_logger(session="s1")  # as a session binds its own at its start
    log.debug("hidden")
    level.set("debug")
    log.debug("shown")
    level.set("error")
    log.info("hidden again")
    log.error("an error")
    events = [json.loads(line)["event"] for line in out.getvalue().splitlines()]
    assert events == ["shown", "an error"]
