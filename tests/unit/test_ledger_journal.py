"""The ledger's bookkeeping, the outbox's count of what left it, the journal's batching and
crash recovery: socket-free (the journal's writer thread and SQLite are real)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from lxml import etree

from proxy.journal import Journal, recover, replayable, storable
from proxy.ledger import Ledger, LedgerError
from proxy.outbox import Outbox
from proxy.store import Store
from proxy.xmpp import stanza as st


def message(n: int, **attrs: str) -> st.Element:
    el = st.element("message", {"id": f"m{n}", "to": "bob@localhost", "type": "chat", **attrs})
    st.sub(el, "body", text=f"body {n}")
    return el


def test_lane_counts_every_exit_and_refuses_more_than_it_holds() -> None:
    ledger = Ledger()
    assert [ledger.c2s.enter() for _ in range(5)] == [0, 1, 2, 3, 4]
    assert ledger.c2s.leave(2, "delivered") == 2
    assert ledger.c2s.leave(1, "stored") == 3
    assert ledger.c2s.leave(0, "bounced") == 3
    assert not ledger.empty
    with pytest.raises(LedgerError):
        ledger.c2s.leave(3, "discarded")
    ledger.c2s.leave(2, "discarded")
    assert ledger.empty
    assert ledger.summary()["c2s"] == {"entered": 5, "held": 0, "delivered": 2, "stored": 1,
                                       "bounced": 0, "discarded": 2}


def test_outbox_left_counts_confirmed_and_drained_stanzas() -> None:
    ids = iter(range(100))
    box = Outbox(domain="localhost", max_buffer=100, barrier_every=3,
                 new_id=lambda: f"xf-barrier-{next(ids)}", connected=True)
    written = [box.submit(message(n)) for n in range(3)]
    barrier = written[-1][-1]
    assert barrier.get("id", "").startswith("xf-") and box.left == 0
    reply = st.element("iq", {"type": "result", "id": barrier.get("id", "")})
    assert box.on_reply(reply)
    assert box.left == 3 and box.size == 0
    box.submit(message(3))
    box.connection_lost()
    box.submit(message(4))
    assert box.left == 3  # losing the connection confirms nothing and removes nothing
    assert [el.get("id") for el in box.drain()] == ["m3", "m4"]
    assert box.left == 5


def test_outbox_left_follows_the_servers_own_acks() -> None:
    box = Outbox(domain="localhost", max_buffer=100, barrier_every=50,
                 new_id=lambda: "xf-b", connected=True)
    box.sm_enable()
    for n in range(4):
        box.submit(message(n))
    box.on_sm_ack(3)
    assert box.left == 3 and [el.get("id") for el in box.held()] == ["m3"]


def test_what_is_replayed_and_what_is_stored() -> None:
    assert replayable(message(1))
    assert replayable(st.element("presence", {"type": "subscribe", "to": "bob@localhost"}))
    assert not replayable(st.element("presence"))
    assert not replayable(st.element("iq", {"type": "get", "id": "q1"}))
    assert not replayable(message(1, id="xf-roster-1"))
    assert storable(message(1)) and storable(message(1, type="error"))
    assert storable(st.element("presence", {"type": "subscribe"}))
    assert not storable(st.element("presence", {"type": "unavailable"}))
    assert not storable(st.element("iq", {"type": "result"}))


def held_in_journal(store: Store) -> list[tuple[str, str, int]]:
    """(session, lane, n) of every stanza the journal still holds (its rows less its cuts)."""
    cuts = {(s, lane): left for s, lane, left in
            store.conn.execute("SELECT session, lane, left_n FROM ledger_cuts")}
    held: list[tuple[str, str, int]] = []
    for s, lane, first, last in store.conn.execute(
            "SELECT session, lane, first_n, last_n FROM ledger_journal ORDER BY lane, first_n"):
        held += [(s, lane, n) for n in range(first, last + 1) if n >= cuts.get((s, lane), 0)]
    return held


async def _journal_round(path: Path) -> tuple[list[str], list[tuple[str, str, int]]]:
    store = Store(str(path))
    journal = Journal(str(path))
    order: list[str] = []
    for n in range(4):
        journal.put("s1", "c2s", n, "alice@localhost",
                    etree.tostring(message(n)), 1000.0 + n)
    journal.when_durable(lambda: order.append("acked after 4 puts"))
    journal.put("s1", "s2c", 0, "alice@localhost", etree.tostring(message(9)), 2000.0)
    journal.cut("s1", "s2c", 1)  # delivered in the same turn: never reaches the disk
    await asyncio.sleep(0)  # the end of this turn hands the batch over
    await asyncio.wait_for(_durable(journal), 5)
    rows = held_in_journal(store)
    assert store.conn.execute("SELECT count(*) FROM ledger_journal").fetchone()[0] == 1
    journal.cut("s1", "c2s", 2)
    await asyncio.wait_for(_durable(journal), 5)
    assert [n for _, _, n in held_in_journal(store)] == [2, 3]
    journal.cut("s1", "c2s", 4)
    journal.drop("s1")  # the session ended with an empty ledger: nothing left of it
    await asyncio.wait_for(_durable(journal), 5)
    assert held_in_journal(store) == []
    assert store.conn.execute("SELECT count(*) FROM ledger_cuts").fetchone()[0] == 0
    await journal.close()
    store.close()
    return order, rows


async def _durable(journal: Journal) -> None:
    done = asyncio.Event()
    journal.when_durable(done.set)
    await done.wait()


def test_journal_batches_per_turn_and_acks_only_after_the_commit(tmp_path: Path) -> None:
    order, rows = asyncio.run(_journal_round(tmp_path / "j.sqlite3"))
    assert order == ["acked after 4 puts"]
    assert rows == [("s1", "c2s", 0), ("s1", "c2s", 1), ("s1", "c2s", 2), ("s1", "c2s", 3)]


def test_when_durable_with_nothing_pending_runs_at_once(tmp_path: Path) -> None:
    async def go() -> list[int]:
        Store(str(tmp_path / "k.sqlite3")).close()
        journal = Journal(str(tmp_path / "k.sqlite3"))
        called: list[int] = []
        journal.when_durable(lambda: called.append(1))
        await journal.close()
        return called

    assert asyncio.run(go()) == [1]


def test_recovery_settles_a_crashed_ledger(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite3"
    store = Store(str(path))
    c2s = [message(0),  # confirmed: the cut below says so, its row was not yet trimmed
           message(1),  # a client message the server never confirmed
           st.element("iq", {"type": "get", "id": "q"})]  # session-bound
    s2c = [message(2, **{"from": "bob@localhost/pc"}),  # for the client
           st.element("presence", {"from": "bob@localhost/pc"})]
    with store.transaction() as c:
        c.executemany("INSERT INTO ledger_journal (session, lane, first_n, last_n, account,"
                      " queued_at, stanzas) VALUES (?, ?, ?, ?, ?, ?, ?)",
                      [(s, lane, 0, len(els) - 1, "alice@localhost", 1_000_000.0,
                        b"\0".join(etree.tostring(el) for el in els))
                       for s, lane, els in (("s1", "c2s", c2s), ("s1", "s2c", s2c))])
        c.execute("INSERT INTO ledger_cuts (session, lane, left_n) VALUES ('s1', 'c2s', 1)")
    counts = recover(store, now=2_000_000.0, stored_ttl=60, domain="localhost")
    assert counts == {"sessions": 1, "stored": 1, "pending": 1, "discarded": 2}
    [(pending, expires)] = store.pending.take("alice@localhost")
    assert etree.fromstring(pending).get("id") == "m1" and expires == 2_000_060.0
    [offline] = store.offline.offline_take("alice@localhost", now=2_000_000.0)
    delivered = etree.fromstring(offline)
    assert delivered.get("id") == "m2"
    assert delivered.find("{urn:xmpp:delay}delay").get("stamp").startswith("1970-01-12T13:46:40")
    assert store.conn.execute("SELECT count(*) FROM ledger_journal").fetchone()[0] == 0
    assert store.conn.execute("SELECT count(*) FROM ledger_cuts").fetchone()[0] == 0
    assert recover(store, now=2_000_000.0, stored_ttl=60, domain="localhost")["sessions"] == 0
    store.close()


def test_origin_id_is_the_message_id() -> None:
    from proxy.client_edge import ensure_origin_id

    sid = "{urn:xmpp:sid:0}origin-id"
    with_id = message(1)
    ensure_origin_id(with_id)
    assert with_id.find(sid).get("id") == "m1"
    bare = st.element("message", {"to": "bob@localhost"})
    ensure_origin_id(bare)  # no id (maybe a rule removed it): left alone
    assert bare.get("id") is None and bare.find(sid) is None
    kept = message(2)
    st.sub(kept, "origin-id", {"id": "theirs"}, namespace="urn:xmpp:sid:0")
    ensure_origin_id(kept)
    assert [o.get("id") for o in kept.iter(sid)] == ["theirs"]
    error = message(3, type="error")
    ensure_origin_id(error)
    assert error.find(sid) is None


def test_origin_id_from_the_journals_template_is_the_same_bytes_and_leaves_it_alone() -> None:
    from proxy.client_edge import ensure_origin_id
    from proxy.journal import origin_id_template
    from proxy.xmpp import codec

    template = origin_id_template()
    made, copied = message(1), message(1)
    ensure_origin_id(made)
    for _ in range(2):  # a second message would show a changed template
        copied = message(1)
        ensure_origin_id(copied, template)
    assert codec.document(copied) == codec.document(made)
    assert codec.serialize(copied) == codec.serialize(made)
    assert len(template) == 0 and template.get("id") is None and template.getparent() is None


def test_merged_batches_keep_the_furthest_cut_and_many_stanzas_fit_one_row(
        tmp_path: Path) -> None:
    from proxy.journal import _Batch, _merge

    first, second = _Batch(), _Batch()
    first.puts[("s", "c2s")] += [(n, "a@x", b"<m/>", 1.0) for n in range(3)]
    second.puts[("s", "c2s")] += [(n, "a@x", b"<m/>", 1.0) for n in range(3, 5)]
    second.cuts[("s", "c2s")] = 4
    first.cuts[("s", "c2s")] = 1
    merged = _merge([first, second])
    assert [p[0] for p in merged.puts[("s", "c2s")]] == [0, 1, 2, 3, 4]
    assert merged.cuts == {("s", "c2s"): 4}

    path = tmp_path / "many.sqlite3"
    store = Store(str(path))
    journal = Journal(str(path))
    big = _Batch()
    big.puts[("s", "s2c")] += [(n, "a@x", b"<m/>", 1.0) for n in range(1234)]
    journal._write(big)
    assert store.conn.execute("SELECT count(*) FROM ledger_journal").fetchone()[0] == 1
    assert len(held_in_journal(store)) == 1234
    journal._write(merged)
    assert [n for _, lane, n in held_in_journal(store) if lane == "c2s"] == [4]
    asyncio.run(journal.close())
    store.close()


def test_recovery_stamps_a_message_from_its_accounts_own_domain(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "domains.sqlite3"))
    with store.transaction() as c:
        c.execute("INSERT INTO ledger_journal (session, lane, first_n, last_n, account,"
                  " queued_at, stanzas) VALUES ('s1', 's2c', 0, 0, 'carol@beta.test',"
                  " 1000000.0, ?)", (etree.tostring(message(5, **{"from": "a@localhost/x"})),))
    recover(store, now=2_000_000.0, stored_ttl=60, domain="localhost")  # the default domain
    [offline] = store.offline.offline_take("carol@beta.test", now=2_000_000.0)
    assert etree.fromstring(offline).find("{urn:xmpp:delay}delay").get("from") == "beta.test"
    store.close()
