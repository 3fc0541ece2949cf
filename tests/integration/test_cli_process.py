"""The command line as a process (issue 15): ``run`` with a broken configuration ends in one
line naming the key and exit 2, never a traceback; ``--version``; the rule packs found from an
installed copy of the package. No XMPP server needed."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers.certs import make_cert

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def front(*args: str, cwd: Path = REPO, env: dict[str, str] | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> tuple[tuple[Path, Path], ...]:
    return (make_cert(tmp_path_factory.mktemp("a")), make_cert(tmp_path_factory.mktemp("b")))


def closed_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as server:
        return int(server.getsockname()[1])


def broken_config(tmp_path: Path, pairs: tuple[tuple[Path, Path], ...], kind: str) -> Path:
    """A configuration broken in one way (``kind``), or a sound one (any other kind)."""
    (cert, key), (_other_cert, other_key) = pairs
    data: dict[str, Any] = {
        "listen": [{"host": "127.0.0.1", "port": 0}],
        "tls": {"cert": str(cert), "key": str(key)},
        "upstream": {"host": "127.0.0.1", "port": closed_port()},
    }
    if kind == "mismatched key":
        data["tls"]["key"] = str(other_key)
    elif kind == "swapped":
        data["tls"] = {"cert": str(key), "key": str(cert)}
    elif kind == "non-PEM CA":
        (tmp_path / "ca.der").write_bytes(b"\x30\x82\x01\x0a" + os.urandom(64))
        data["upstream"]["ca"] = "ca.der"
    elif kind == "missing store folder":
        data["store"] = {"path": "no/such/folder/store.sqlite3"}
        # Only the store's folder is wrong: the admin socket that would sit beside it is
        # off, so that a deep temporary folder cannot make its path a second error.
        data["admin"] = {"socket": None}
    elif kind == "misspelt listen host":
        data["listen"] = [{"host": "no-such-host.invalid", "port": 0}]
    elif kind == "cross-check":
        data["shutdown"] = {"ack_wait": 10, "drain_timeout": 5}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("kind,key", [
    ("mismatched key", "tls.key"),
    ("swapped", "tls.cert"),
    ("non-PEM CA", "upstream.ca"),
    ("missing store folder", "store.path"),
    ("misspelt listen host", "listen[0].host"),
    ("cross-check", "shutdown.ack_wait"),
])
def test_run_with_a_broken_configuration_exits_2_with_one_line(
        tmp_path: Path, pairs: tuple[tuple[Path, Path], ...], kind: str, key: str) -> None:
    done = front("run", "-c", str(broken_config(tmp_path, pairs, kind)))
    assert done.returncode == 2, done
    assert "Traceback" not in done.stderr + done.stdout
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"xmpp-front: invalid configuration: {key}: "), line
    events = [json.loads(x) for x in done.stdout.splitlines()]
    errors = [e for e in events if e["level"] == "error"]
    assert [(e["event"], e["key"]) for e in errors] == [("config_invalid", key)]
    assert line.endswith(errors[0]["problem"])
    assert not any(e["event"] == "listening" for e in events)
    # check says the same, on the same line.
    checked = front("check", "-c", str(broken_config(tmp_path, pairs, kind)))
    assert checked.returncode == 2 and line in checked.stderr.splitlines()


def test_run_logs_an_unreachable_upstream_and_starts(
        tmp_path: Path, pairs: tuple[tuple[Path, Path], ...]) -> None:
    config = broken_config(tmp_path, pairs, "sound")
    log_path = tmp_path / "out.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "proxy", "run", "-c", str(config)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 15
        while "listening" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    text = log_path.read_text()
    assert proc.returncode == 0 and "Traceback" not in text
    events = [json.loads(line) for line in text.splitlines()]
    assert events[0]["event"] == "starting", events[0]  # version and file first
    events = events[1:]
    assert events[0]["event"] == "upstream_unreachable", events[0]
    assert events[0]["level"] == "warning" and events[0]["key"] == "upstream.host/upstream.port"
    assert any(e["event"] == "listening" for e in events)


def test_version_of_the_module_and_the_script() -> None:
    done = front("--version")
    assert done.returncode == 0 and done.stdout == f"xmpp-front {VERSION}\n"

def test_version_of_the_installed_script(tmp_path: Path) -> None:
    script = shutil.which("xmpp-front")
    installed = subprocess.run([sys.executable, "-c", "import proxy; print(proxy.__file__)"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=30)
    if script is None or installed.stdout.strip() != str(REPO / "proxy" / "__init__.py"):
        pytest.skip("xmpp-front is not installed from this checkout (pip install -e .)")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == f"xmpp-front {VERSION}\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package as setuptools installs it (its build_py step, package data included),
    built from a copy of the source so the checkout is left alone."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "proxy", src / "proxy",
                    ignore=shutil.ignore_patterns("__pycache__"))
    lib = tmp_path_factory.mktemp("lib")
    subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
                    "build_py", "--build-lib", str(lib)], cwd=src, check=True,
                   capture_output=True, timeout=120)
    return lib


def test_the_rule_packs_are_installed_with_the_package(built: Path, tmp_path: Path) -> None:
    packs = sorted(p.name for p in (built / "proxy" / "rulepacks").glob("*.yaml"))
    assert packs == sorted(p.name for p in (REPO / "rules").glob("*.yaml"))
    env = {"PYTHONPATH": str(built)}
    done = subprocess.run([sys.executable, "-c", "import proxy; print(proxy.__file__)"],
                          cwd=tmp_path, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=30)
    assert done.stdout.strip() == str(built / "proxy" / "__init__.py")
    # From a folder with no rules/ of its own: the installed packs, all passing.
    done = front("rules", "test", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1].endswith(" passed, 0 failed") and not lines[-1].startswith("0 ")
    sources = {line.split(": ")[0].removeprefix("PASS ") for line in lines[:-1]}
    assert sources == {str(built / "proxy" / "rulepacks" / name) for name in packs}
    # And a folder given on the command line.
    done = front("rules", "test", str(built / "proxy" / "rulepacks"), cwd=tmp_path, env=env)
    assert done.returncode == 0 and done.stdout.splitlines()[-1] == lines[-1]


def test_the_readme_check_command_works_on_a_fresh_clone() -> None:
    """README "Running it": make-cert.sh, then check, in a copy of examples/ (a fresh
    clone has no certificate there). A short folder, like a clone's: the example's admin
    socket sits in it, and pytest's own folders can be too deep for a Unix socket path."""
    with tempfile.TemporaryDirectory(prefix="xf-") as folder:
        _readme_check(Path(folder))


def _readme_check(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    make, check = "bash examples/make-cert.sh", "xmpp-front check -c examples/legacy-prosody.yaml"
    assert make in readme and check in readme and readme.index(make) < readme.index(check)
    examples = tmp_path / "examples"
    examples.mkdir()
    for name in ("legacy-prosody.yaml", "make-cert.sh"):
        shutil.copy(REPO / "examples" / name, examples / name)
    made = subprocess.run(["bash", "examples/make-cert.sh"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert (examples / "key.pem").stat().st_mode & 0o077 == 0
    done = front("check", "-c", str(examples / "legacy-prosody.yaml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{examples / 'legacy-prosody.yaml'}: OK\n"
    assert "invalid configuration" not in done.stderr
