"""The proxy as its own upstream: refused by `check` and `run` (issue 10, "No loop")."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.cli import EXIT_INVALID_CONFIG, main
from proxy.config import parse_config
from proxy.loopcheck import OwnStreamIds, is_local_address, upstream_loop_problems

LOCAL = {"127.0.0.1", "::1", "192.0.2.10", "2001:db8::10"}  # this fake machine's addresses


def fake_resolver(names: dict[str, set[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str, port: int) -> set[str]:
        return names.get(host, {host})
    return resolve


def problems(listen: list[dict[str, object]], upstream: dict[str, object],
             names: dict[str, set[str]] | None = None) -> list[str]:
    config = parse_config({"listen": listen, "upstream": upstream})
    return upstream_loop_problems(config, resolver=fake_resolver(names or {}),
                                  is_local=LOCAL.__contains__)


def test_the_defaults_are_a_loop_and_the_message_names_the_keys() -> None:
    found = upstream_loop_problems(parse_config(None))  # real resolver, real machine
    assert len(found) == 1
    assert "upstream.host/upstream.port" in found[0] and "listen[0]" in found[0]
    assert "127.0.0.1:5222" in found[0]


@pytest.mark.parametrize("listen_host,upstream_host,loop", [
    ("127.0.0.1", "127.0.0.1", True),
    ("127.0.0.1", "localhost", True),  # a name resolving to the listener's address
    ("localhost", "::1", True),
    ("127.0.0.1", "127.0.0.2", False),  # another loopback address: another socket
    ("127.0.0.1", "192.0.2.10", False),
    ("0.0.0.0", "192.0.2.10", True),  # wildcard: any local IPv4 address
    ("0.0.0.0", "127.0.0.1", True),
    ("0.0.0.0", "2001:db8::10", False),  # an IPv4-only wildcard
    ("::", "2001:db8::10", True),
    ("::", "127.0.0.1", False),  # asyncio sets IPV6_V6ONLY on "::"
    ("", "192.0.2.10", True),  # every interface, both families
    ("0.0.0.0", "198.51.100.1", False),  # not this machine
    ("0.0.0.0", "legacy.example", False),
])
def test_same_port_loops_when_the_host_is_ours(listen_host: str, upstream_host: str,
                                              loop: bool) -> None:
    names = {"localhost": {"127.0.0.1", "::1"}, "legacy.example": {"198.51.100.1"}}
    found = problems([{"host": listen_host, "port": 5222}],
                     {"host": upstream_host, "port": 5222}, names)
    assert bool(found) is loop


def test_another_port_is_never_a_loop_and_is_not_even_resolved() -> None:
    def resolver(host: str, port: int) -> set[str]:
        raise AssertionError("resolved needlessly")
    config = parse_config({"listen": [{"host": "0.0.0.0", "port": 5222}],
                           "upstream": {"host": "127.0.0.1", "port": 15222}})
    assert upstream_loop_problems(config, resolver=resolver) == []


def test_the_second_listener_is_named() -> None:
    found = problems([{"host": "127.0.0.1", "port": 5222},
                      {"host": "127.0.0.1", "port": 5223, "direct_tls": True}],
                     {"host": "127.0.0.1", "port": 5223, "tls": "direct"})
    assert len(found) == 1 and "listen[1]" in found[0]


def test_an_unresolvable_upstream_is_not_called_a_loop() -> None:
    assert problems([{"host": "0.0.0.0", "port": 5222}],
                    {"host": "nowhere.invalid", "port": 5222},
                    {"nowhere.invalid": set()}) == []


def test_is_local_address_on_this_machine() -> None:
    assert is_local_address("127.0.0.1") and is_local_address("127.5.5.5")
    assert not is_local_address("192.0.2.99")  # TEST-NET-1: nobody's
    assert not is_local_address("not-an-ip")


def write_config(tmp_path: Path, data: dict[str, object], tls_pair: tuple[Path, Path]) -> Path:
    for name, real in zip(("cert.pem", "key.pem"), tls_pair, strict=True):
        (tmp_path / name).write_bytes(real.read_bytes())
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", ["check", "run"])
def test_check_and_run_refuse_a_self_upstream_with_exit_2(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
        tls_pair: tuple[Path, Path]) -> None:
    path = write_config(tmp_path, {"listen": [{"host": "127.0.0.1", "port": 5222}],
                                   "upstream": {"host": "127.0.0.1", "port": 5222}}, tls_pair)
    assert main([command, "-c", str(path)]) == EXIT_INVALID_CONFIG
    (line,) = capsys.readouterr().err.splitlines()
    assert "invalid configuration: upstream.host/upstream.port" in line
    assert "listen[0]" in line


def test_check_accepts_a_distinct_upstream(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           tls_pair: tuple[Path, Path]) -> None:
    path = write_config(tmp_path, {"listen": [{"host": "127.0.0.1", "port": 5222}],
                                   "upstream": {"host": "127.0.0.1", "port": 15222}},
                        tls_pair)
    assert main(["check", "-c", str(path)]) == 0


def test_own_stream_ids_are_retired() -> None:
    ids = OwnStreamIds()
    ids.issued("a")
    ids.issued("b")
    assert "a" in ids and "b" in ids and "c" not in ids
    ids.retire(["a", "b"])
    assert len(ids) == 0 and "a" not in ids
