"""What a reload (SIGHUP) changes, pure: the keys that differ between the configuration in
force and the one read again, which of them a running proxy can take on, and the
configuration it runs with afterwards (the new one, except what needs a restart, which keeps
its old value so the running objects and the configuration never disagree).

Taken on: TLS certificate and key (new handshakes), limits, abuse limits, log level and
inspection, rules, stream management, upstream (except the domain), the other served
domains (``domains``: their servers and certificates), reconnect, shutdown;
each for new connections and sessions, live ones keep what they started with. The rest is
read once at start.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .config import Config

# Keys (a section or section.key) that only a restart takes on, and why.
RESTART_KEYS: dict[str, str] = {
    "listen": "listeners are bound at start",
    "workers": "the worker processes are started at start",
    "store": "the store is opened at start",
    "durability": "the journal is opened at start",
    "metrics": "the metrics listener is bound at start",
    "admin": "the admin socket is bound at start",
    "upstream.domain": "sessions, stored messages and disco are keyed by the domain",
    "log.format": "the log renderer is set up at start",
    "csi": "the feature pipeline is built at start",
    "roster": "the feature pipeline is built at start",
    "features": "the feature pipeline is built at start",
    "push": "the feature pipeline is built at start",
    "carbons": "the feature pipeline is built at start",
    "blocking": "the feature pipeline is built at start",
    "reconnect.settle_presence": "the feature pipeline is built at start",
}


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, in the schema's order; a list counts as one value."""
    if not dataclasses.is_dataclass(old) or isinstance(old, type):
        return [] if old == new else [prefix]
    keys: list[str] = []
    for f in dataclasses.fields(old):
        if f.metadata.get("internal"):
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        keys += changed_keys(getattr(old, f.name), getattr(new, f.name), key)
    return keys


def restart_reason(key: str) -> str | None:
    for restart, why in RESTART_KEYS.items():
        if key == restart or key.startswith(restart + "."):
            return why
    return None


def _with_value(config: Any, path: list[str], value: Any) -> Any:
    head, *rest = path
    inner = value if not rest else _with_value(getattr(config, head), rest, value)
    return dataclasses.replace(config, **{head: inner})


def _value(config: Any, path: list[str]) -> Any:
    for part in path:
        config = getattr(config, part)
    return config


@dataclass(frozen=True)
class ReloadPlan:
    config: Config  # what the proxy runs with from now on
    applied: list[str]  # changed keys taken on
    needs_restart: list[str]  # changed keys not taken on (their old values stay)

    @property
    def changed(self) -> list[str]:
        return self.applied + self.needs_restart


def plan_reload(old: Config, new: Config) -> ReloadPlan:
    applied: list[str] = []
    needs_restart: list[str] = []
    effective = new
    for key in changed_keys(old, new):
        if restart_reason(key) is None:
            applied.append(key)
            continue
        needs_restart.append(key)
        path = key.split(".")
        effective = _with_value(effective, path, _value(old, path))
    return ReloadPlan(effective, applied, needs_restart)
