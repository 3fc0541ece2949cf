"""``workers: N``, the pure parts: the home hash, the handoff message, the negotiation core's
handover, the merged metrics and the home's primed parser."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from proxy.abuse import LoginThrottle
from proxy.commands import CheckLogin, HandOver, ToClient
from proxy.config import AbuseConfig, ConfigError, parse_config
from proxy.journal import Journal, create_journal_file, recover
from proxy.negotiation import NegotiationCore
from proxy.store import Store
from proxy.net.worker_link import primed_header
from proxy.workers import (HANDOFF_HEADER, BadHandoff, Handoff, home_of, merge_metrics,
                           resolve_workers)
from proxy.xmpp import codec, ns
from proxy.xmpp import stanza as st

DOMAIN = "localhost"


def test_home_is_the_same_in_every_process_whatever_its_hash_seed() -> None:
    accounts = [f"user{i}@localhost" for i in range(20)]
    here = [home_of(a, 3) for a in accounts]
    code = ("import sys; from proxy.workers import home_of; "
            f"print([home_of(a, 3) for a in {accounts!r}])")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={**os.environ, "PYTHONHASHSEED": seed},
                             cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__)))))
        assert out.stdout.strip() == str(here)


def test_home_ignores_case_uses_every_worker_and_one_worker_is_home_to_all() -> None:
    assert home_of("Juliet@Capulet.Lit", 4) == home_of("juliet@capulet.lit", 4)
    assert {home_of(f"u{i}@localhost", 4) for i in range(200)} == {0, 1, 2, 3}
    assert {home_of(f"u{i}@localhost", 1) for i in range(20)} == {0}


def test_workers_setting_is_a_number_or_auto() -> None:
    assert parse_config({}).workers == 1
    assert parse_config({"workers": 3}).workers == 3
    assert resolve_workers(parse_config({"workers": "auto"}).workers, cpu_count=6) == 6
    for bad in (0, 257, "many", True):
        with pytest.raises(ConfigError, match="workers"):
            parse_config({"workers": bad})


def handoff(**kw: object) -> Handoff:
    fields: dict[str, object] = dict(
        conn="ab12", accepted_by=1, listener=0, remote=("192.0.2.7", 40000),
        local=("127.0.0.1", 5222), tls={"tls_version": "TLSv1.3", "cipher": None},
        header={"to": "localhost", "version": "1.0"},
        auth="<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>",
        failures=2, after="")
    fields.update(kw)
    return Handoff(**fields)  # type: ignore[arg-type]


def test_a_handoff_round_trips_through_its_framing() -> None:
    sent = handoff(remote=("2001:db8::1", 1), after="<iq type='get' id='x'/>",
                   domain="example.net")
    data = sent.encode()
    size = Handoff.length(data[:HANDOFF_HEADER.size])
    assert size == len(data) - HANDOFF_HEADER.size
    assert Handoff.decode(data[HANDOFF_HEADER.size:]) == sent
    assert Handoff.decode(handoff(remote=None, local=None).encode()[4:]).remote is None


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"version": 99}',
                                  b'{"version": 1, "conn": "x"}'])
def test_a_bad_handoff_is_refused(body: bytes) -> None:
    with pytest.raises(BadHandoff):
        Handoff.decode(body)


def test_a_handoff_length_out_of_bounds_is_refused() -> None:
    with pytest.raises(BadHandoff):
        Handoff.length(HANDOFF_HEADER.pack(0))
    with pytest.raises(BadHandoff):
        Handoff.length(HANDOFF_HEADER.pack(1 << 30))


def plain(user: str, password: str = "secret", authzid: str = "") -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def auth_event(text: str | None) -> codec.StanzaReceived:
    return codec.StanzaReceived(st.element("auth", {"mechanism": "PLAIN"}, namespace=ns.SASL,
                                           text=text))


def accounts_homed(home: int, count: int = 2, n: int = 1) -> list[str]:
    found = [f"u{i}" for i in range(1000) if home_of(f"u{i}@{DOMAIN}", count) == home]
    return found[:n]


def core_at_sasl(worker: int, throttle: LoginThrottle | None = None) -> NegotiationCore:
    core = NegotiationCore(DOMAIN, direct_tls=True, timeout=30, worker=worker,
                           home_of=lambda account: home_of(account, 2), throttle=throttle)
    core.receive(codec.StreamOpened({"to": DOMAIN, "version": "1.0"}, ns.CLIENT))
    return core


def test_an_account_of_another_worker_is_handed_over_before_any_check() -> None:
    (elsewhere,) = accounts_homed(1)
    (here,) = accounts_homed(0)
    core = core_at_sasl(0)
    (command,) = core.receive(auth_event(plain(elsewhere)))
    assert isinstance(command, HandOver) and command.home == 1
    assert str(command.account) == f"{elsewhere}@{DOMAIN}" and command.failures == 0
    assert command.auth.text == plain(elsewhere) and command.auth.get("mechanism") == "PLAIN"
    (check,) = core_at_sasl(0).receive(auth_event(plain(here)))
    assert isinstance(check, CheckLogin)


def test_a_challenge_response_login_is_handed_over_as_an_initial_response() -> None:
    (elsewhere,) = accounts_homed(1)
    core = core_at_sasl(0)
    core.receive(auth_event(None))  # the empty challenge
    response = st.element("response", namespace=ns.SASL, text=plain(elsewhere))
    (command,) = core.receive(codec.StanzaReceived(response))
    assert isinstance(command, HandOver) and command.auth.text == plain(elsewhere)


def test_the_home_continues_from_the_auth_and_counts_failures_and_throttle_there() -> None:
    (account,) = accounts_homed(1)
    throttle = LoginThrottle(AbuseConfig(login_failures_per_account=1, login_failures_free=0,
                                         login_delay=0, login_delay_max=0))
    throttle.failed(f"{account}@{DOMAIN}", "192.0.2.7")  # one failure at the home already
    home = NegotiationCore(DOMAIN, direct_tls=True, timeout=30, worker=1, throttle=throttle,
                           home_of=lambda a: home_of(a, 2))
    auth = st.element("auth", {"mechanism": "PLAIN"}, namespace=ns.SASL, text=plain(account))
    out = home.taken_over(auth, failures=2, domain=DOMAIN)
    # The home's throttle refuses it, and it is the third failure: the stream ends.
    assert [c.element.tag for c in out if isinstance(c, ToClient)] == [
        ns.qname(ns.SASL, "failure")]
    assert home.phase == "failed" and home.failures == 3


def test_the_home_checks_the_login_it_was_handed() -> None:
    (account,) = accounts_homed(1)
    home = NegotiationCore(DOMAIN, direct_tls=True, timeout=30, worker=1,
                           home_of=lambda a: home_of(a, 2))
    auth = st.element("auth", {"mechanism": "PLAIN"}, namespace=ns.SASL, text=plain(account))
    (check,) = home.taken_over(auth, failures=0, domain=DOMAIN)
    assert isinstance(check, CheckLogin) and check.authcid == account


def test_a_second_account_on_a_handed_over_connection_is_not_handed_again() -> None:
    (other,) = accounts_homed(0)
    home = NegotiationCore(DOMAIN, direct_tls=True, timeout=30, worker=1,
                           home_of=lambda a: home_of(a, 2))
    auth = st.element("auth", {"mechanism": "PLAIN"}, namespace=ns.SASL, text=plain(other))
    out = home.taken_over(auth, failures=0, domain=DOMAIN)
    assert not any(isinstance(c, HandOver) for c in out)
    (failure,) = [c.element for c in out if isinstance(c, ToClient)]
    assert failure[0].tag == ns.qname(ns.SASL, "temporary-auth-failure")


def test_the_primed_header_opens_a_stream_the_home_parser_reads_on_from() -> None:
    parser = codec.XmlStreamParser()
    header = {"to": DOMAIN, "version": "1.0",
              "{http://www.w3.org/XML/1998/namespace}lang": "en", "from": "a'b@x"}
    (opened,) = parser.feed(primed_header(header))
    assert isinstance(opened, codec.StreamOpened)
    assert opened.attrs["to"] == DOMAIN and opened.attrs["from"] == "a'b@x"
    (got,) = parser.feed(b"<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>=</response>")
    assert isinstance(got, codec.StanzaReceived)


def test_metrics_are_summed_across_workers_except_the_shared_store_gauges() -> None:
    one = ("# HELP xmpp_front_sessions s\n# TYPE xmpp_front_sessions gauge\n"
           'xmpp_front_sessions{state="active"} 2\n'
           "xmpp_front_stored_messages 7\nxmpp_front_relay_seconds_sum 0.25\n")
    two = ("# HELP xmpp_front_sessions s\n# TYPE xmpp_front_sessions gauge\n"
           'xmpp_front_sessions{state="active"} 3\n'
           "xmpp_front_stored_messages 7\nxmpp_front_relay_seconds_sum 0.5\n")
    merged = merge_metrics([one, two])
    assert merged == ["# HELP xmpp_front_sessions s", "# TYPE xmpp_front_sessions gauge",
                      'xmpp_front_sessions{state="active"} 5', "xmpp_front_stored_messages 7",
                      "xmpp_front_relay_seconds_sum 0.75"]


# Store safety with several processes ----------------------------------------------------------


def test_a_worker_journal_in_its_own_file_is_settled_into_the_shared_store(
        tmp_path: Path) -> None:
    store = Store(str(tmp_path / "front.sqlite3"))
    journal_file = str(tmp_path / "w1.journal")
    create_journal_file(journal_file)

    async def write() -> None:
        journal = Journal(journal_file)
        for n in range(3):
            msg = st.element("message", {"id": f"m{n}", "from": "bob@localhost/pc",
                                         "type": "chat"})
            st.sub(msg, "body", text=str(n))
            journal.put("s1", "s2c", n, "alice@localhost", etree.tostring(msg), 1000.0)
        journal.cut("s1", "s2c", 1)  # the first was delivered
        done = asyncio.Event()
        journal.when_durable(done.set)
        await asyncio.wait_for(done.wait(), 5)
        await journal.close()

    asyncio.run(write())  # then the worker dies: the rows stay in its file
    assert store.conn.execute("SELECT count(*) FROM ledger_journal").fetchone()[0] == 0
    counts = recover(store, now=2000.0, stored_ttl=60, domain="localhost",
                     journal_path=journal_file)
    assert counts["stored"] == 2
    taken = store.offline.offline_take("alice@localhost", now=2000.0)
    assert [etree.fromstring(x).get("id") for x in taken] == ["m1", "m2"]
    again = recover(store, now=2000.0, stored_ttl=60, domain="localhost",
                    journal_path=journal_file)
    assert again["stored"] == 0  # emptied: never settled twice
    store.close()


_WRITER = """
import sys
from proxy.store import Store
store = Store(sys.argv[1], threaded_writes=False)
for n in range(int(sys.argv[2])):
    with store.transaction():
        store.offline.offline_put(sys.argv[3], b"<message id='%d'/>" % n, 1e12)
store.close()
"""


def test_two_processes_write_the_store_at_once_without_losing_a_write(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.sqlite3")
    Store(path).close()  # the supervisor's migrations, once
    root = Path(__file__).resolve().parents[2]
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, path, "300", f"u{i}@x"],
                                cwd=root, stderr=subprocess.PIPE) for i in range(2)]
    for w in writers:
        _, err = w.communicate(timeout=60)
        assert w.returncode == 0, err.decode()
    store = Store(path)
    assert [store.offline.count(f"u{i}@x") for i in range(2)] == [300, 300]
    store.close()


def test_the_clean_stop_mark_is_left_to_the_supervisor(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite3")
    Store(path).close()
    worker = Store(path, clean_start=True, mark_clean=False)
    assert worker.clean_start
    worker.close()
    assert not Store(path).clean_start  # the worker's close did not mark the stop clean


def test_the_home_takes_the_domain_the_header_chose_and_refuses_one_it_does_not_serve() -> None:
    served = {"example.org": "example.org", "example.net": "example.net"}
    (account,) = [f"u{i}" for i in range(1000)
                  if home_of(f"u{i}@example.net", 2) == 1][:1]
    home = NegotiationCore("example.org", direct_tls=True, timeout=30, worker=1,
                           served=served, home_of=lambda a: home_of(a, 2))
    auth = st.element("auth", {"mechanism": "PLAIN"}, namespace=ns.SASL, text=plain(account))
    (check,) = home.taken_over(auth, failures=0, domain="Example.NET")
    assert isinstance(check, CheckLogin) and str(check.account) == f"{account}@example.net"
    other = NegotiationCore("example.org", direct_tls=True, timeout=30, worker=1,
                            served=served, home_of=lambda a: home_of(a, 2))
    out = other.taken_over(auth, failures=0, domain="elsewhere.example")
    assert other.phase == "failed" and b"host-unknown" in out[-1].error  # type: ignore[union-attr]


def test_check_refuses_worker_sockets_that_do_not_fit_a_unix_socket_path(
        tmp_path: Path) -> None:
    from proxy.preflight import check_worker_sockets

    deep = tmp_path / ("d" * 100)
    config = parse_config({"workers": 2, "store": {"path": str(deep / "s.sqlite3")}})
    (finding,) = check_worker_sockets(config)
    assert finding.key == "workers" and "Unix socket path" in finding.message
    assert check_worker_sockets(parse_config({"workers": 2, "store": {
        "path": str(tmp_path / "s.sqlite3")}})) == []
    assert check_worker_sockets(parse_config({"store": {"path": str(deep / "s.sqlite3")}})) == []


def test_a_relayed_stream_drops_its_parser_and_the_bytes_flow_both_ways(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The accepting worker parses nothing once it relays: the client's stream holds no
    lxml parser (not even until the idle check), and bytes go to the home and back."""
    from proxy.net import xmlstream
    from proxy.net.worker_link import open_link, relay
    from tests.unit.test_xmlstream import HEADER, pair

    monkeypatch.setattr(xmlstream, "PARSER_IDLE", 60.0)  # the idle check would not help
    path = tmp_path / "home.sock"

    async def home(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(7) == b"handoff"
        while data := await reader.read(4096):
            writer.write(b"home:" + data)
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(home, str(path))
        try:
            async with pair() as (stream, reader, writer):
                writer.write(HEADER + b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                             b"mechanism='PLAIN'>AGEAYg==</auth>")
                assert isinstance(await stream.next_event(5), codec.StreamOpened)
                await stream.next_element(5)
                assert stream.parser.holds_parser
                done: asyncio.Future[tuple[str, bool]] = (
                    asyncio.get_running_loop().create_future())
                link = await open_link(path, b"handoff", done)
                relaying = asyncio.ensure_future(relay(stream, link, done))
                writer.write(b"<message/>")
                assert await asyncio.wait_for(reader.readexactly(15), 5) == b"home:<message/>"
                assert not stream.parser.holds_parser
                writer.close()
                assert (await asyncio.wait_for(relaying, 5)).startswith("client")
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))
