"""Configuration loading: defaults, types, ranges, unknown keys, and the CLI's exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from proxy.cli import main
from proxy.config import ConfigError, check_files, load_config, parse_config


def test_empty_config_gives_the_documented_defaults() -> None:
    config = parse_config(None)
    assert [(li.host, li.port, li.direct_tls) for li in config.listen] == [
        ("127.0.0.1", 5222, False)]
    assert config.upstream.tls == "starttls" and config.upstream.verify is True
    assert config.limits.max_stanza_bytes == 262144
    assert config.limits.max_depth == 128
    assert (config.limits.output_soft_bytes, config.limits.output_hard_bytes) == (
        262144, 4194304)
    assert (config.log.format, config.log.level) == ("json", "info")


def test_the_issue_example_parses() -> None:
    config = parse_config(yaml.safe_load("""
listen:
  - {host: 127.0.0.1, port: 5222}
  - {host: 127.0.0.1, port: 5223, direct_tls: true}
tls: {cert: cert.pem, key: key.pem}
upstream: {host: 127.0.0.1, port: 15222, domain: localhost, tls: starttls, verify: true, ca: null}
limits: {max_stanza_bytes: 262144}
log: {format: json, level: info}
"""))
    assert config.listen[1].direct_tls is True
    assert config.upstream.port == 15222 and config.upstream.ca is None


@pytest.mark.parametrize("data,message", [
    ({"upstream": {"port": 0}}, "upstream.port: must be a port number 1-65535"),
    ({"upstream": {"port": "5222"}}, "upstream.port: must be an integer"),
    ({"upstream": {"tls": "maybe"}}, "upstream.tls: must be one of 'starttls', 'direct', 'none'"),
    ({"upstream": {"verify": "yes"}}, "upstream.verify: must be true or false"),
    ({"upstream": {"prot": 1}}, "upstream.prot: unknown option"),
    ({"listen": [{"port": 70000}]}, "listen[0].port: must be a port number"),
    ({"listen": {"port": 1}}, "listen: must be a list"),
    ({"listen": []}, "listen: at least one listener"),
    ({"limits": {"max_stanza_bytes": 10}}, "limits.max_stanza_bytes: must be between"),
    ({"limits": {"max_stanza_bytes": True}}, "limits.max_stanza_bytes: must be an integer"),
    ({"limits": {"max_depth": 0}}, "limits.max_depth: must be between 1 and 250"),
    ({"limits": {"max_depth": 251}}, "limits.max_depth: must be between 1 and 250"),
    ({"limits": {"output_soft_bytes": 1000}}, "limits.output_soft_bytes: must be between"),
    ({"limits": {"output_hard_bytes": 1000}}, "limits.output_hard_bytes: must be between"),
    ({"limits": {"output_soft_bytes": 65537, "output_hard_bytes": 65536}},
     "limits.output_soft_bytes: must not be above output_hard_bytes"),
    ({"log": {"format": "xml"}}, "log.format: must be one of"),
    ({"nonsense": 1}, "nonsense: unknown option"),
    ([1, 2], "must be a YAML mapping"),
])
def test_errors_name_the_key_and_the_problem(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert message in str(info.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("tls: {cert: my.pem, key: my.key}\n")
    config = load_config(tmp_path / "c.yaml")
    assert config.path(config.tls.cert) == tmp_path / "my.pem"
    assert check_files(config) == [f"tls.cert: no such file: {tmp_path / 'my.pem'}",
                                   f"tls.key: no such file: {tmp_path / 'my.key'}"]


def test_check_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  tls_pair: tuple[Path, Path]) -> None:
    (tmp_path / "cert.pem").write_bytes(tls_pair[0].read_bytes())
    (tmp_path / "key.pem").write_bytes(tls_pair[1].read_bytes())
    good = tmp_path / "good.yaml"
    good.write_text("upstream: {port: 15222}\n")
    assert main(["check", "-c", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("upstream: {port: nope}\n")
    assert main(["check", "-c", str(bad)]) == 2
    assert "upstream.port: must be an integer" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("upstream: [\n")
    assert main(["check", "-c", str(broken)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert main(["check", "-c", str(tmp_path / "missing.yaml")]) == 2
