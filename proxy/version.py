"""The package's version: from the installed metadata, else from the source tree's
``pyproject.toml`` (a checkout run with ``python -m proxy`` and never installed)."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

DISTRIBUTION = "xmpp-front"
_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def pyproject_version(path: Path = _PYPROJECT) -> str | None:
    try:
        project = tomllib.loads(path.read_text(encoding="utf-8")).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if project.get("name") != DISTRIBUTION:
        return None
    version = project.get("version")
    return version if isinstance(version, str) else None


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return pyproject_version() or "unknown"
