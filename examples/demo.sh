#!/usr/bin/env bash
# Set up what is missing (Prosody, the Python package), then run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/setup
exec python3 examples/demo.py
