#!/usr/bin/env bash
# A self-signed certificate to try xmpp-front with: cert.pem and key.pem beside this script,
# the pair examples/legacy-prosody.yaml names. Clients must be told to accept it; a real
# deployment uses a certificate for its XMPP domain from a CA (e.g. Let's Encrypt).
#
#   bash examples/make-cert.sh [DOMAIN]      # DOMAIN: upstream.domain (default: localhost)
#
# An existing pair is kept (remove both files for a new one).
set -euo pipefail
domain=${1:-localhost}
cd "$(dirname "$0")"
if [ -e cert.pem ] && [ -e key.pem ]; then
  echo "make-cert: $(pwd)/cert.pem and key.pem exist: kept"
  exit 0
fi
command -v openssl >/dev/null 2>&1 || { echo "make-cert: needs openssl (apt-get install openssl)" >&2; exit 1; }
umask 077  # the key is owner-only from its first byte
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=$domain" \
  -addext "subjectAltName=DNS:$domain" -keyout key.pem -out cert.pem 2>/dev/null
chmod 644 cert.pem
echo "make-cert: $(pwd)/cert.pem and key.pem (0600) for $domain, valid 365 days"
