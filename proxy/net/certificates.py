"""The TLS contexts of the served domains: the certificate each client gets, chosen by the
server name its ClientHello carries (SNI), and the context each domain's upstream is
verified with.

``tls:`` is the default pair: a client that sends no server name, or one the proxy has no
certificate of its own for, gets it. A domain with its own pair (``domains[i].tls``) has a
context of its own; the default context's ``sni_callback`` switches a handshake to it. Both
listener kinds (direct TLS and STARTTLS) handshake with the default context, so both choose
the same way. A reload loads every pair into fresh contexts first (a broken pair refuses the
reload), then takes them on at once: new handshakes get the new certificates, established
connections keep theirs.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path

from ..config import Config, domain_key
from .upstream import client_tls_context


def load_pair(context: ssl.SSLContext, cert: Path, key: Path) -> ssl.SSLContext:
    context.load_cert_chain(cert, key)
    return context


def new_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    return load_pair(ssl.create_default_context(ssl.Purpose.CLIENT_AUTH), cert, key)


def domain_contexts(config: Config) -> dict[str, ssl.SSLContext]:
    """A fresh context for each domain with its own pair, by ``domain_key`` (raises
    ssl.SSLError or OSError for a pair that does not load)."""
    return {key: new_server_context(config.path(served.tls.cert), config.path(served.tls.key))
            for key, served in config.served.items()
            if served.index is not None and served.own_tls}


class ServerCertificates:
    """The contexts client handshakes use: ``context`` (the default pair, whose SNI callback
    hands a handshake to a domain's own context)."""

    def __init__(self, config: Config) -> None:
        self.context = new_server_context(config.path(config.tls.cert),
                                          config.path(config.tls.key))
        self.by_domain = domain_contexts(config)
        self.context.sni_callback = self._choose

    def _choose(self, ssl_object: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                context: ssl.SSLContext) -> None:
        """OpenSSL's servername callback: the domain's own certificate, if it has one."""
        if server_name is None:
            return
        key = domain_key(server_name)
        chosen = self.by_domain.get(key) if key is not None else None
        if chosen is not None:
            ssl_object.context = chosen

    def prepare(self, config: Config) -> dict[str, ssl.SSLContext]:
        """Every pair of ``config`` loaded, the default one into a scratch context: what a
        reload would take on. Raises ssl.SSLError or OSError."""
        new_server_context(config.path(config.tls.cert), config.path(config.tls.key))
        return domain_contexts(config)

    def take_on(self, config: Config, old: Config,
                by_domain: dict[str, ssl.SSLContext]) -> None:
        """The reload's pairs: the default one into the live context (its callback stays),
        the domains' contexts swapped in. If the default pair changed on disk since it was
        prepared and fails now, the old one is loaded back and the error raised."""
        try:
            load_pair(self.context, config.path(config.tls.cert), config.path(config.tls.key))
        except (ssl.SSLError, OSError):
            try:
                load_pair(self.context, old.path(old.tls.cert), old.path(old.tls.key))
            except (ssl.SSLError, OSError):
                pass
            raise
        self.by_domain = by_domain


def upstream_context(config: Config) -> ssl.SSLContext | None:
    """The context a domain's upstream (``config.upstream``) is verified with."""
    upstream = config.upstream
    if upstream.tls == "none":
        return None
    return client_tls_context(upstream, str(config.path(upstream.ca)) if upstream.ca else None)


def _verification(config: Config) -> tuple[str, bool, str | None]:
    upstream = config.upstream
    return upstream.tls, upstream.verify, str(config.path(upstream.ca)) if upstream.ca else None


def upstream_contexts(config: Config, old: Config | None = None,
                      previous: Mapping[str, ssl.SSLContext | None] | None = None
                      ) -> dict[str, ssl.SSLContext | None]:
    """Each served domain's upstream context, by its name. On a reload (``old``,
    ``previous``), a domain whose TLS settings did not change keeps its context, and with
    it the TLS sessions it can resume."""
    contexts: dict[str, ssl.SSLContext | None] = {}
    kept = {s.name: s.config for s in old.served.values()} if old is not None else {}
    for served in config.served.values():
        before = kept.get(served.name)
        if (previous is not None and served.name in previous and before is not None
                and _verification(before) == _verification(served.config)):
            contexts[served.name] = previous[served.name]
        else:
            contexts[served.name] = upstream_context(served.config)
    return contexts
