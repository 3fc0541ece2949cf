"""``xmpp-front --version``: the installed version, else the source tree's."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from proxy import version
from proxy.cli import main

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT_VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_flag_prints_the_version_and_exits_0(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"xmpp-front {version.package_version()}\n"


def test_the_installed_metadata_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadata, "version",
                        lambda name: "9.9.9" if name == "xmpp-front" else "?")
    assert version.package_version() == "9.9.9"


def test_without_metadata_the_pyproject_version_is_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert version.package_version() == PYPROJECT_VERSION


def test_a_foreign_or_missing_pyproject_gives_no_version(tmp_path: Path) -> None:
    other = tmp_path / "pyproject.toml"
    other.write_text('[project]\nname = "something-else"\nversion = "1.0"\n')
    assert version.pyproject_version(other) is None
    assert version.pyproject_version(tmp_path / "missing.toml") is None
