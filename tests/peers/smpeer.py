"""A raw XMPP peer that keeps honest XEP-0198 books, for counting lost and duplicated messages.

It logs in with a RawClient, enables stream management (or not), sends numbered messages,
answers every ``<r/>`` with the number of stanzas it really handled and remembers the ``h``
of every ``<a/>`` it is sent. So a test knows exactly which messages the proxy acknowledged
(its promise) and which bodies arrived, in which order, how often.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from .rawclient import RawClient, StreamClosed, raw_login

SM = "urn:xmpp:sm:3"
CLIENT = "jabber:client"


class SmPeer:
    def __init__(self, raw: RawClient) -> None:
        self.raw = raw
        self.sm = False
        self.sm_id: str | None = None
        self.sent: list[str] = []  # labels of the stanzas sent since <enable/>, in order
        self.acked_h = 0  # the last h the server side acknowledged
        self.handled = 0  # stanzas received since <enabled/> (what our <a/> reports)
        self.bodies: list[str] = []  # message bodies received, in order
        self.errors: list[etree._Element] = []  # message errors received
        self.other: list[etree._Element] = []  # anything else worth a look
        self.closed = False
        self._reader: asyncio.Task[None] | None = None
        self._acked = asyncio.Event()

    @classmethod
    async def login(cls, host: str, port: int, user: str, password: str, resource: str, *,
                    sm: bool = True, resume_max: int | None = None, presence: bool = True,
                    direct_tls: bool = False, timeout: float = 10.0,
                    to: str = "localhost") -> SmPeer:
        raw = await raw_login(host, port, user, password, direct_tls=direct_tls,
                              resource=resource, timeout=timeout, to=to)
        peer = cls(raw)
        try:
            if sm:
                extra = f" max='{resume_max}'" if resume_max is not None else ""
                raw.send(f"<enable xmlns='{SM}' resume='true'{extra}/>")
                while True:
                    el = await raw.read_element(timeout)
                    if el.tag == f"{{{SM}}}enabled":
                        peer.sm, peer.sm_id = True, el.get("id")
                        break
                    # Sent before <enabled/>: not counted by either side (XEP-0198 §4).
                    peer._handle(el, counted=False)
            if presence:
                peer._send("<presence/>", "presence")
        except BaseException:
            raw.abort()
            raise
        peer._reader = asyncio.create_task(peer._read())
        return peer

    @property
    def acked(self) -> list[str]:
        """Labels of what the other side has acknowledged so far."""
        return self.sent[:self.acked_h]

    def _send(self, xml: str, label: str) -> None:
        self.raw.send(xml)
        self.sent.append(label)

    def message(self, to: str, body: str, *, msg_id: str | None = None) -> None:
        mid = f" id={quoteattr(msg_id or body)}"
        self._send(f"<message to={quoteattr(to)} type='chat'{mid}><body>{escape(body)}</body>"
                   "</message>", body)

    def request_ack(self) -> None:
        self.raw.send(f"<r xmlns='{SM}'/>")

    async def wait_acked(self, count: int, timeout: float = 10.0) -> None:
        """Until at least ``count`` stanzas are acknowledged (asks as needed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.acked_h < count:
            self._acked.clear()
            self.request_ack()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"acked {self.acked_h} of {count} in {timeout}s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._acked.wait(), min(0.5, remaining))

    async def wait_bodies(self, count: int, timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self.bodies) < count:
            if loop.time() > deadline:
                raise TimeoutError(f"{len(self.bodies)} of {count} messages in {timeout}s")
            await asyncio.sleep(0.02)

    def _handle(self, el: etree._Element, *, counted: bool = True) -> None:
        tag = el.tag
        if tag == f"{{{SM}}}r":
            self.raw.send(f"<a xmlns='{SM}' h='{self.handled}'/>")
            return
        if tag == f"{{{SM}}}a":
            self.acked_h = int(el.get("h", "0"))
            self._acked.set()
            return
        if etree.QName(el).namespace == CLIENT:
            self.handled += counted
            if el.tag == f"{{{CLIENT}}}message":
                if el.get("type") == "error":
                    self.errors.append(el)
                else:
                    body = el.findtext(f"{{{CLIENT}}}body")
                    if body is not None:
                        self.bodies.append(body)
                return
            if el.tag == f"{{{CLIENT}}}iq" and el.get("type") in ("get", "set"):
                self.raw.send(f"<iq type='error' id={quoteattr(el.get('id', ''))}"
                              f" to={quoteattr(el.get('from', ''))}><error type='cancel'>"
                              "<service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/>"
                              "</error></iq>")
        self.other.append(el)

    async def _read(self) -> None:
        try:
            while True:
                el = await self.raw.read_element(3600)
                self._handle(el)
        except (StreamClosed, TimeoutError, OSError):
            pass
        finally:
            self.closed = True

    async def wait_closed(self, timeout: float = 10.0) -> None:
        assert self._reader is not None
        await asyncio.wait_for(asyncio.shield(self._reader), timeout)

    async def close(self) -> None:
        """A clean close: </stream:stream>, then wait (briefly) for the peer's."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        await self.raw.close()

    def abort(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        self.raw.abort()


def duplicates(bodies: list[str]) -> dict[str, int]:
    return {body: n for body, n in Counter(bodies).items() if n > 1}
