"""The relay loop of one bound session: two pumps, client→upstream and upstream→client.

Shell code: stanzas go through the SessionCore, which decides; the pumps only read, write
and close. Stream errors and clean closes pass through to the other side.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from lxml import etree

from ..session import Outputs, SessionCore
from ..xmpp import codec, ns
from ..xmpp import stanza as st
from .client_side import BoundClient
from .xmlstream import ConnectionLost, XmlStream

Element = etree._Element

_STREAM_ERROR = ns.qname(ns.STREAM, "error")
CLOSE_GRACE = 2.0  # seconds the other side gets to close its stream after ours


class SessionEnded(Exception):
    """How a session ended: ``reason`` for the log, and what each side is to be told."""

    def __init__(self, reason: str, *, to_client: bytes | None = None,
                 to_upstream: bytes | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.to_client = to_client
        self.to_upstream = to_upstream


def _write(out: Outputs, client: XmlStream, upstream: XmlStream) -> None:
    for el in out.to_upstream:
        upstream.send(el)
    for el in out.to_client:
        client.send(el)


async def _pump_client(core: SessionCore, client: XmlStream, upstream: XmlStream) -> None:
    while True:
        try:
            event = await client.next_event()
        except ConnectionLost as exc:
            raise SessionEnded(f"client connection lost ({exc})") from exc
        if isinstance(event, codec.StanzaReceived):
            el = event.element
            if st.is_stanza(el):
                _write(core.from_client(el), client, upstream)
                await upstream.drain()
            elif el.tag == _STREAM_ERROR:
                raise SessionEnded(f"client stream error: {st.error_condition(el)}",
                                   to_upstream=codec.serialize(el))
            else:
                raise SessionEnded(
                    f"unsupported element from client: {el.tag}",
                    to_client=codec.stream_error("unsupported-stanza-type",
                                                 f"{etree.QName(el).localname} is not supported"))
        elif isinstance(event, codec.StreamClosed):
            raise SessionEnded("client closed the stream")
        elif isinstance(event, codec.StreamViolation):
            raise SessionEnded(f"client stream violation: {event.condition}",
                               to_client=codec.stream_error(event.condition, event.text))
        else:
            raise SessionEnded("client sent a second stream header",
                               to_client=codec.stream_error("not-well-formed",
                                                            "unexpected stream header"))


async def _pump_upstream(core: SessionCore, client: XmlStream, upstream: XmlStream) -> None:
    while True:
        try:
            event = await upstream.next_event()
        except ConnectionLost as exc:
            raise SessionEnded(
                f"upstream connection lost ({exc})",
                to_client=codec.stream_error("remote-connection-failed",
                                             "the connection to the legacy server was lost"),
            ) from exc
        if isinstance(event, codec.StanzaReceived):
            el = event.element
            if el.tag == _STREAM_ERROR:
                condition = st.error_condition(el) or "undefined-condition"
                # The server's own error passes to the client: system-shutdown, conflict, ...
                raise SessionEnded(f"upstream stream error: {condition}",
                                   to_client=codec.serialize(el))
            if st.is_stanza(el):
                _write(core.from_upstream(el), client, upstream)
                await client.drain()
        elif isinstance(event, codec.StreamClosed):
            raise SessionEnded("upstream closed the stream")
        elif isinstance(event, codec.StreamViolation):
            raise SessionEnded(
                f"upstream stream violation: {event.condition}",
                to_client=codec.stream_error("remote-connection-failed",
                                             "the legacy server broke the stream"),
                to_upstream=codec.stream_error(event.condition, event.text))


async def run_relay(bound: BoundClient, core: SessionCore, log: Any) -> str:
    """Relay until one side ends; then close both sides. Returns why it ended."""
    client, upstream = bound.stream, bound.upstream.stream
    pumps = [asyncio.create_task(_pump_client(core, client, upstream)),
             asyncio.create_task(_pump_upstream(core, client, upstream))]
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        # The proxy is stopping: the client was told already; leave the server cleanly.
        upstream.send_bytes(codec.STREAM_CLOSE)
        upstream.abort()
        client.abort()
        raise
    finally:
        for task in pumps:
            task.cancel()
        for task in pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    ended: BaseException | None = None
    for task in done:
        if not task.cancelled():
            ended = task.exception()
            break
    if not isinstance(ended, SessionEnded):
        log.error("relay_failed", exc_info=ended)
        ended = SessionEnded("internal error",
                             to_client=codec.stream_error("internal-server-error"))
    await asyncio.gather(
        client.close(ended.to_client, wait_for_peer=CLOSE_GRACE),
        upstream.close(ended.to_upstream, wait_for_peer=CLOSE_GRACE))
    return ended.reason
