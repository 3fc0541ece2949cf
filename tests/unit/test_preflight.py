"""The preflight behind ``check`` and ``run`` (issue 15, "Safe configuration"): each broken
configuration is rejected naming its key; warnings do not fail."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import EXIT_INVALID_CONFIG, main
from proxy.config import Config, Listener, parse_config
from proxy.preflight import Finding, errors, preflight
from tests.peers.certs import make_cert


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two unrelated self-signed pairs for localhost, one for another name, an encrypted
    key, a DER certificate and an expired certificate of the first key."""
    a_cert, a_key = make_cert(tmp_path_factory.mktemp("a"))
    b_cert, b_key = make_cert(tmp_path_factory.mktemp("b"))
    c_cert, c_key = make_cert(tmp_path_factory.mktemp("c"), "other.example")
    other = tmp_path_factory.mktemp("other")
    encrypted, der = other / "encrypted.key", other / "cert.der"
    csr, expired = other / "a.csr", other / "expired.crt"
    for cmd in (["openssl", "pkey", "-in", str(a_key), "-aes256", "-passout", "pass:secret",
                 "-out", str(encrypted)],
                ["openssl", "x509", "-in", str(a_cert), "-outform", "der", "-out", str(der)],
                ["openssl", "req", "-new", "-key", str(a_key), "-subj", "/CN=localhost",
                 "-addext", "subjectAltName=DNS:localhost", "-out", str(csr)],
                ["openssl", "x509", "-req", "-in", str(csr), "-signkey", str(a_key),
                 "-days", "-1", "-copy_extensions", "copy", "-out", str(expired)]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=30)
    return {"cert": a_cert, "key": a_key, "other_cert": b_cert, "other_key": b_key,
            "named_cert": c_cert, "named_key": c_key, "encrypted_key": encrypted,
            "der": der, "expired_cert": expired}


def no_dns(host: str, port: int) -> list[str]:
    """A resolver for tests: addresses are themselves, ``localhost`` is loopback, any other
    name does not resolve (as a misspelt host)."""
    if host == "localhost":
        return ["127.0.0.1"]
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known") from None
    return [host]


def make_config(tmp_path: Path, pki: dict[str, Path], **overrides: Any) -> Config:
    """A sound configuration in ``tmp_path`` (store beside it), with ``overrides``."""
    data: dict[str, Any] = {
        "listen": [{"host": "127.0.0.1", "port": 0}],
        "tls": {"cert": str(pki["cert"]), "key": str(pki["key"])},
        "upstream": {"host": "127.0.0.1", "port": 15222},
    }
    for section, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(section), dict):
            data[section] = {**data[section], **value}
        else:
            data[section] = value
    return parse_config(data, base_dir=tmp_path)


def findings(config: Config) -> list[Finding]:
    return preflight(config, probe=False, resolve_listen=no_dns)


def only_error(config: Config) -> Finding:
    found = errors(findings(config))
    assert len(found) == 1, [str(f) for f in found]
    return found[0]


def test_a_sound_configuration_has_no_findings(tmp_path: Path, pki: dict[str, Path]) -> None:
    assert findings(make_config(tmp_path, pki)) == []


# ------------------------------------------------------------------------- certificate


def test_a_key_that_is_not_the_certificates_is_rejected(tmp_path: Path,
                                                        pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, tls={"key": str(pki["other_key"])}))
    assert found.key == "tls.key"
    assert "is not the key of the certificate" in found.message
    assert str(pki["other_key"]) in found.message and str(pki["cert"]) in found.message


def test_swapped_certificate_and_key_are_named_as_swapped(tmp_path: Path,
                                                          pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, tls={"cert": str(pki["key"]),
                                                       "key": str(pki["cert"])}))
    assert found.key == "tls.cert"
    assert "swapped" in found.message


def test_a_key_given_as_the_certificate_is_rejected(tmp_path: Path,
                                                    pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, tls={"cert": str(pki["other_key"])}))
    assert found.key == "tls.cert" and "holds a private key, not a certificate" in found.message


def test_a_certificate_given_as_the_key_is_rejected(tmp_path: Path,
                                                    pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, tls={"key": str(pki["other_cert"])}))
    assert found.key == "tls.key" and "holds a certificate, not a private key" in found.message


def test_a_der_certificate_is_not_pem(tmp_path: Path, pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, tls={"cert": str(pki["der"])}))
    assert found.key == "tls.cert" and "not a PEM file" in found.message


def test_a_pem_file_with_a_broken_body_is_rejected(tmp_path: Path,
                                                   pki: dict[str, Path]) -> None:
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                      "-----END CERTIFICATE-----\n")
    found = only_error(make_config(tmp_path, pki, tls={"cert": str(broken)}))
    assert found.key == "tls.cert" and "not a valid certificate" in found.message


def test_an_encrypted_key_is_rejected_without_a_prompt(tmp_path: Path,
                                                       pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, tls={"key": str(pki["encrypted_key"])}))
    assert found.key == "tls.key" and "encrypted" in found.message


def test_missing_and_folder_paths_are_named(tmp_path: Path, pki: dict[str, Path]) -> None:
    found = errors(findings(make_config(tmp_path, pki, tls={"cert": "nope.pem",
                                                            "key": str(tmp_path)})))
    assert [f.key for f in found] == ["tls.cert", "tls.key"]
    assert f"no such file: {tmp_path / 'nope.pem'}" == found[0].message
    assert "not a file" in found[1].message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_key_is_named(tmp_path: Path, pki: dict[str, Path]) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(pki["key"].read_bytes())
    key.chmod(0)
    found = only_error(make_config(tmp_path, pki, tls={"key": str(key)}))
    assert found.key == "tls.key" and "cannot read" in found.message


def test_a_certificate_for_another_name_is_a_warning(tmp_path: Path,
                                                     pki: dict[str, Path]) -> None:
    config = make_config(tmp_path, pki, tls={"cert": str(pki["named_cert"]),
                                             "key": str(pki["named_key"])})
    (found,) = findings(config)
    assert (found.key, found.warning) == ("tls.cert", True)
    assert "does not name upstream.domain 'localhost'" in found.message
    named = make_config(tmp_path, pki, tls={"cert": str(pki["named_cert"]),
                                            "key": str(pki["named_key"])},
                        upstream={"domain": "other.example"})
    assert findings(named) == []


def test_an_expired_certificate_is_a_warning(tmp_path: Path, pki: dict[str, Path]) -> None:
    (found,) = findings(make_config(tmp_path, pki, tls={"cert": str(pki["expired_cert"])}))
    assert (found.key, found.warning) == ("tls.cert", True)
    assert "has expired" in found.message


# ------------------------------------------------------------------------- upstream CA


def test_a_non_pem_ca_file_is_rejected(tmp_path: Path, pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, upstream={"ca": str(pki["der"])}))
    assert found.key == "upstream.ca" and "not a PEM file of CA certificates" in found.message


def test_a_key_as_the_ca_file_is_rejected(tmp_path: Path, pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, upstream={"ca": str(pki["key"])}))
    assert found.key == "upstream.ca" and "it holds a private key" in found.message


def test_a_ca_file_is_loaded_even_without_verification(tmp_path: Path,
                                                       pki: dict[str, Path]) -> None:
    # The proxy loads it whenever TLS is on, so a broken one fails the start either way.
    found = only_error(make_config(tmp_path, pki, upstream={"ca": str(pki["der"]),
                                                            "verify": False}))
    assert found.key == "upstream.ca"
    good = findings(make_config(tmp_path, pki, upstream={"ca": str(pki["cert"]),
                                                         "verify": False}))
    assert [(f.key, f.warning) for f in good] == [("upstream.ca", True)]


def test_a_good_ca_file_passes(tmp_path: Path, pki: dict[str, Path]) -> None:
    assert findings(make_config(tmp_path, pki, upstream={"ca": str(pki["cert"])})) == []


# ------------------------------------------------------------------------- listeners


def test_a_misspelt_listen_host_is_rejected(tmp_path: Path, pki: dict[str, Path]) -> None:
    config = make_config(tmp_path, pki, listen=[{"host": "127.0.0.1", "port": 0},
                                                {"host": "lcoalhost", "port": 5223}])
    found = only_error(config)
    assert found.key == "listen[1].host" and "cannot resolve 'lcoalhost'" in found.message


def test_a_listen_address_of_another_machine_is_rejected(tmp_path: Path,
                                                         pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, listen=[{"host": "192.0.2.7", "port": 0}]))
    assert found.key == "listen[0].host" and "not an address of this machine" in found.message


def test_wildcard_listeners_pass(tmp_path: Path, pki: dict[str, Path]) -> None:
    config = make_config(tmp_path, pki, listen=[{"host": "0.0.0.0", "port": 0}])
    assert findings(config) == []


def test_two_listeners_on_one_address_are_rejected(tmp_path: Path,
                                                   pki: dict[str, Path]) -> None:
    config = make_config(tmp_path, pki, listen=[
        {"host": "127.0.0.1", "port": 5299}, {"host": "localhost", "port": 5299}])
    found = only_error(config)
    assert found.key == "listen[1]" and "is already listen[0]" in found.message


def test_a_taken_port_is_a_warning_only(tmp_path: Path, pki: dict[str, Path]) -> None:
    config = make_config(tmp_path, pki, listen=[{"host": "127.0.0.1", "port": 5299}])
    found = preflight(config, probe=True, resolve_listen=no_dns,
                      bind=lambda listener, address: "Address already in use")
    taken = [f for f in found if f.key == "listen[0].port"]
    assert len(taken) == 1 and taken[0].warning
    assert "127.0.0.1:5299" in taken[0].message and "Address already in use" in taken[0].message


# ------------------------------------------------------------------------- folders


def test_a_missing_store_folder_is_rejected(tmp_path: Path, pki: dict[str, Path]) -> None:
    found = only_error(make_config(tmp_path, pki, store={"path": "nowhere/x.sqlite3"}))
    assert found.key == "store.path"
    assert f"the folder {tmp_path / 'nowhere'} does not exist" in found.message


def test_a_store_folder_that_is_a_file_is_rejected(tmp_path: Path,
                                                   pki: dict[str, Path]) -> None:
    (tmp_path / "afile").write_text("x")
    found = only_error(make_config(tmp_path, pki, store={"path": "afile/x.sqlite3"}))
    assert found.key == "store.path" and "is not a folder" in found.message


def test_a_store_file_that_is_not_sqlite_is_rejected(tmp_path: Path,
                                                     pki: dict[str, Path]) -> None:
    (tmp_path / "notes.txt").write_text("my notes\n")
    found = only_error(make_config(tmp_path, pki, store={"path": "notes.txt"}))
    assert found.key == "store.path" and "is not an SQLite database" in found.message


def test_an_existing_store_passes(tmp_path: Path, pki: dict[str, Path]) -> None:
    from proxy.store import Store

    Store(str(tmp_path / "s.sqlite3")).close()
    assert findings(make_config(tmp_path, pki, store={"path": "s.sqlite3"})) == []


def test_a_read_only_store_folder_is_rejected(tmp_path: Path, pki: dict[str, Path],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)  # root can write anywhere: pretend
    found = only_error(make_config(tmp_path, pki))
    assert found.key == "store.path" and "Permission denied" in found.message


def test_a_memory_store_with_the_journal_is_a_warning(tmp_path: Path,
                                                      pki: dict[str, Path]) -> None:
    found = findings(make_config(tmp_path, pki, store={"path": ":memory:"}))
    assert [(f.key, f.warning) for f in found] == [("durability.mode", True)]


def test_a_capture_dir_under_a_file_is_rejected(tmp_path: Path, pki: dict[str, Path]) -> None:
    (tmp_path / "afile").write_text("x")
    found = only_error(make_config(tmp_path, pki, log={"capture_dir": "afile/captures"}))
    assert found.key == "log.capture_dir" and "is not a folder" in found.message
    # A folder the proxy can create is fine.
    assert findings(make_config(tmp_path, pki, log={"capture_dir": "new/captures"})) == []


# ------------------------------------------------------------------------- cross-checks


@pytest.mark.parametrize("overrides,key,text", [
    ({"abuse": {"login_delay_max": 30}, "limits": {"negotiation_timeout": 30}},
     "abuse.login_delay_max", "must be below limits.negotiation_timeout (30 s)"),
    ({"abuse": {"login_delay_max": 8}, "limits": {"negotiation_timeout": 5}},
     "abuse.login_delay_max", "must be below limits.negotiation_timeout (5 s)"),
    ({"stream_management": {"resume_timeout": 700, "max_resume_timeout": 600}},
     "stream_management.resume_timeout", "must not exceed stream_management.max_resume"),
    ({"shutdown": {"ack_wait": 6, "drain_timeout": 5}},
     "shutdown.ack_wait", "must not exceed shutdown.drain_timeout (5 s)"),
    ({"reconnect": {"base": 10, "cap": 5}}, "reconnect.base", "must not exceed reconnect.cap"),
    ({"reconnect": {"first_delay_max": 300, "max_outage": 300}},
     "reconnect.first_delay_max", "must be below reconnect.max_outage (300 s)"),
])
def test_settings_that_contradict_each_other_are_rejected(
        tmp_path: Path, pki: dict[str, Path], overrides: dict[str, Any], key: str,
        text: str) -> None:
    found = only_error(make_config(tmp_path, pki, **overrides))
    assert found.key == key and text in found.message


def test_the_limits_of_the_cross_checks_are_accepted(tmp_path: Path,
                                                     pki: dict[str, Path]) -> None:
    config = make_config(tmp_path, pki, abuse={"login_delay_max": 29.5},
                         stream_management={"resume_timeout": 600, "max_resume_timeout": 600},
                         shutdown={"ack_wait": 5, "drain_timeout": 5},
                         reconnect={"base": 5, "cap": 5, "first_delay_max": 10,
                                    "max_outage": 20})
    assert errors(findings(config)) == []
    # No login delays at all: the negotiation timeout does not matter.
    off = make_config(tmp_path, pki, abuse={"login_delay": 0, "login_delay_max": 60})
    assert errors(findings(off)) == []


@pytest.mark.parametrize("overrides,key", [
    ({"upstream": {"connect_timeout": 30}}, "upstream.connect_timeout"),
    ({"reconnect": {"cap": 300}}, "reconnect.cap"),
    ({"abuse": {"login_delay": 9}}, "abuse.login_delay"),
    ({"abuse": {"max_connections": 10, "max_connections_per_address": 20}},
     "abuse.max_connections_per_address"),
    ({"stream_management": {"debug_counter_start": 5}}, "stream_management.debug_counter_start"),
    ({"upstream": {"tls": "none", "ca": "ca.pem"}}, "upstream.ca"),
    ({"listen": [{"host": "127.0.0.1", "port": 0, "proxy_protocol": True}]},
     "listen[0].proxy_protocol_from"),
])
def test_dubious_settings_are_warnings(tmp_path: Path, pki: dict[str, Path],
                                       overrides: dict[str, Any], key: str) -> None:
    found = findings(make_config(tmp_path, pki, **overrides))
    assert [(f.key, f.warning) for f in found] == [(key, True)]


def test_every_problem_is_reported_at_once(tmp_path: Path, pki: dict[str, Path]) -> None:
    config = make_config(tmp_path, pki, tls={"key": str(pki["other_key"])},
                         upstream={"ca": str(pki["der"])}, store={"path": "no/x.sqlite3"},
                         shutdown={"ack_wait": 9})
    assert [f.key for f in errors(findings(config))] == [
        "tls.key", "upstream.ca", "store.path", "shutdown.ack_wait"]


# ------------------------------------------------------------------------- the commands


@pytest.fixture
def upstream_socket() -> Iterator[int]:
    """A listening TCP socket on 127.0.0.1 standing in for the legacy server."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def write(tmp_path: Path, pki: dict[str, Path], **overrides: Any) -> Path:
    data: dict[str, Any] = {
        "listen": [{"host": "127.0.0.1", "port": 0}],
        "tls": {"cert": str(pki["cert"]), "key": str(pki["key"])},
        "upstream": {"host": "127.0.0.1", "port": 15222},
        **overrides,
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_check_passes_a_sound_configuration_silently(
        tmp_path: Path, pki: dict[str, Path], upstream_socket: int,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, pki, upstream={"host": "127.0.0.1", "port": upstream_socket})
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{path}: OK\n" and out.err == ""


def test_check_warns_about_an_unreachable_upstream_and_passes(
        tmp_path: Path, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]  # closed when the block ends: nobody listens there
    path = write(tmp_path, pki, upstream={"host": "127.0.0.1", "port": port})
    assert main(["check", "-c", str(path)]) == 0
    out = capsys.readouterr()
    assert out.out == f"{path}: OK\n"
    (line,) = out.err.splitlines()
    assert line.startswith(f"xmpp-front: warning: upstream.host/upstream.port: cannot connect "
                           f"to 127.0.0.1:{port} now")


def test_check_names_each_problem_on_one_line_and_exits_2(
        tmp_path: Path, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, pki, tls={"cert": str(pki["key"]), "key": str(pki["cert"])},
                 store={"path": "missing/x.sqlite3"})
    assert main(["check", "-c", str(path)]) == EXIT_INVALID_CONFIG
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.splitlines()
    assert [line.split(": ")[2] for line in lines] == ["tls.cert", "store.path"]
    assert all(line.startswith("xmpp-front: invalid configuration: ") for line in lines)


def test_run_refuses_with_the_same_lines_and_a_log_event_each(
        tmp_path: Path, pki: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, pki, tls={"cert": str(pki["cert"]), "key": str(pki["other_key"])})
    assert main(["run", "-c", str(path)]) == EXIT_INVALID_CONFIG
    out = capsys.readouterr()
    (line,) = out.err.splitlines()
    assert line.startswith("xmpp-front: invalid configuration: tls.key: ")
    (event,) = [json.loads(x) for x in out.out.splitlines()]
    assert (event["event"], event["level"], event["key"]) == ("config_invalid", "error",
                                                              "tls.key")
    assert line.endswith(event["problem"]) and event["config"] == str(path)


def test_run_refuses_an_unloadable_file_as_a_json_event(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream: {port: nope}\n")
    assert main(["run", "-c", str(path)]) == EXIT_INVALID_CONFIG
    out = capsys.readouterr()
    (event,) = [json.loads(x) for x in out.out.splitlines()]
    assert event["key"] == "upstream.port" and "must be an integer" in event["problem"]


def test_finding_parse_keeps_key_and_message() -> None:
    assert Finding.parse("upstream.port: must be x") == Finding("upstream.port", "must be x")
    assert str(Finding("a.b", "c")) == "a.b: c"


def test_run_folds_a_multi_line_yaml_error_into_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("upstream: [\n")
    assert main(["run", "-c", str(path)]) == EXIT_INVALID_CONFIG
    out = capsys.readouterr()
    (line,) = out.err.splitlines()
    assert line.startswith(f"xmpp-front: invalid configuration: {path}: not valid YAML: ")
    (event,) = [json.loads(x) for x in out.out.splitlines()]
    assert event["key"] == str(path)


def test_run_does_not_probe_the_listen_ports(tmp_path: Path, pki: dict[str, Path]) -> None:
    tried: list[str] = []
    config = make_config(tmp_path, pki, listen=[{"host": "127.0.0.1", "port": 5299}])
    preflight(config, probe=True, bind_ports=False, resolve_listen=no_dns,
              bind=lambda listener, address: tried.append(address) or "taken")
    assert tried == []
    preflight(config, probe=True, resolve_listen=no_dns,
              bind=lambda listener, address: tried.append(address) or "taken")
    assert tried == ["127.0.0.1"]


def test_listener_binding_probe_reports_a_taken_port(tmp_path: Path,
                                                     pki: dict[str, Path]) -> None:
    from proxy.preflight import try_bind

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert try_bind(Listener("127.0.0.1", port), "127.0.0.1") is not None
    assert try_bind(Listener("127.0.0.1", port), "127.0.0.1") is None
