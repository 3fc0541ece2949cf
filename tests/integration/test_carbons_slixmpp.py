"""Carbons (XEP-0280) emulated for the legacy Prosody, seen by real slixmpp clients: two
resources of one account and a contact, copies both ways, none for a private message."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from slixmpp.xmlstream import ET

from tests.integration.conftest import MakeAccount, MakeProxy
from tests.peers import clients
from tests.peers.util import run

pytestmark = pytest.mark.integration

PLUGINS = ("xep_0030", "xep_0199", "xep_0297", "xep_0280")


def collect(client: Any, event: str) -> asyncio.Queue[str]:
    """Bodies of the forwarded messages of each ``event`` (carbon_sent / carbon_received)."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    key = event  # the stanza interface is named like the event
    client.add_event_handler(event, lambda msg: queue.put_nowait(
        str(msg[key]["body"])))
    return queue


def test_slixmpp_resources_get_sent_and_received_copies_but_not_private_ones(
        make_proxy: MakeProxy, accounts: MakeAccount) -> None:
    proxy = make_proxy()
    (alice, a_pw), (bob, b_pw) = accounts("carla"), accounts("dave")

    async def scenario() -> None:
        phone = await clients.connect_client(alice + "/phone", a_pw, proxy.host, proxy.port,
                                             direct_tls=False, plugins=PLUGINS)
        laptop = await clients.connect_client(alice + "/laptop", a_pw, proxy.host,
                                              proxy.port, direct_tls=False, plugins=PLUGINS)
        desk = await clients.connect_client(bob + "/desk", b_pw, proxy.host, proxy.port,
                                            direct_tls=False)
        try:
            for c in (phone, laptop):
                await asyncio.wait_for(c.plugin["xep_0280"].enable(), 10)
            sent_copies = collect(laptop, "carbon_sent")
            received_copies = collect(laptop, "carbon_received")
            at_bob: asyncio.Queue[str] = asyncio.Queue()
            desk.add_event_handler("message", lambda m: at_bob.put_nowait(str(m["body"])))

            phone.send_message(mto=bob, mbody="from the phone", mtype="chat")
            assert await asyncio.wait_for(sent_copies.get(), 10) == "from the phone"
            assert await asyncio.wait_for(at_bob.get(), 10) == "from the phone"

            desk.send_message(mto=alice + "/phone", mbody="to the phone", mtype="chat")
            assert await asyncio.wait_for(received_copies.get(), 10) == "to the phone"

            private = phone.make_message(mto=bob, mbody="only here", mtype="chat")
            private.append(ET.Element("{urn:xmpp:carbons:2}private"))
            private.send()
            assert await asyncio.wait_for(at_bob.get(), 10) == "only here"
            # One more, ordinary: its copy is the next one the laptop gets, so the private
            # one was never copied (copies keep the order of what the phone sent).
            phone.send_message(mto=bob, mbody="after", mtype="chat")
            assert await asyncio.wait_for(sent_copies.get(), 10) == "after"
            assert sent_copies.empty() and received_copies.empty()
        finally:
            for c in (desk, laptop, phone):
                await clients.disconnect(c)

    run(scenario(), 90)
