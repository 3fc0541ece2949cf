"""Self-signed certificates for Prosody and the proxy under test, made with the openssl CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def make_cert(directory: Path, hostname: str = "localhost") -> tuple[Path, Path]:
    """Create DIR/HOST.crt and DIR/HOST.key (RSA-2048, 1 year, SAN=DNS:HOST).

    Returns (cert, key). Reuses an existing pair so session fixtures stay cheap.
    """
    if shutil.which("openssl") is None:
        raise RuntimeError("openssl CLI not found: install it (apt-get install -y openssl)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert = directory / f"{hostname}.crt"
    key = directory / f"{hostname}.key"
    if cert.exists() and key.exists():
        return cert, key
    cmd = [
        "openssl", "req", "-x509",
        "-newkey", "rsa:2048",
        "-nodes",
        "-days", "365",
        "-subj", f"/CN={hostname}",
        "-addext", f"subjectAltName=DNS:{hostname}",
        "-keyout", str(key),
        "-out", str(cert),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl failed ({proc.returncode}): {proc.stderr.strip()}")
    # Prosody reads the key as root here, but keep it private anyway.
    key.chmod(0o600)
    return cert, key
