"""The SQLite store: schema, transactions, the roster area (versions, change log, items,
pre-approvals) and persistence across reopening a file."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.store import MIGRATIONS, RosterItem, RosterVersion, Store, StoreError

A = "juliet@example.com"
B = "romeo@example.net"


def epochs() -> Callable[[], str]:
    counter = itertools.count(1)
    return lambda: f"e{next(counter)}"


def item(jid: str, *groups: str, name: str | None = None, sub: str = "none",
         ask: str | None = None) -> RosterItem:
    return RosterItem(jid, name, sub, ask, tuple(groups))


# ---------------------------------------------------------------- plumbing


def test_schema_is_created_and_versioned(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.sqlite3"))
    assert store.schema_version() == MIGRATIONS[-1][0]
    tables = {r[0] for r in store.conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"schema_version", "roster_state", "roster_items", "roster_changes",
            "preapprovals"} <= tables
    store.close()
    again = Store(str(tmp_path / "s.sqlite3"))  # reopening migrates nothing twice
    assert again.schema_version() == MIGRATIONS[-1][0]
    again.close()


def test_file_store_uses_wal(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "s.sqlite3"))
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()


def test_memory_store_works() -> None:
    store = Store(":memory:", new_epoch=epochs())
    assert str(store.roster.version(A)) == "e1-0"
    store.close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite3")
    Store(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = 999")
    conn.commit()
    conn.close()
    with pytest.raises(StoreError):
        Store(path)


def test_transaction_rolls_back_on_error() -> None:
    store = Store(":memory:")
    with pytest.raises(RuntimeError), store.transaction() as c:
        c.execute("INSERT INTO preapprovals (account, contact) VALUES ('a', 'b')")
        with store.transaction() as inner:  # nested: joins the outer one
            inner.execute("INSERT INTO preapprovals (account, contact) VALUES ('a', 'c')")
        raise RuntimeError("boom")
    assert store.roster.preapprovals("a") == set()
    with store.transaction() as c:
        c.execute("INSERT INTO preapprovals (account, contact) VALUES ('a', 'b')")
    assert store.roster.preapprovals("a") == {"b"}


# ---------------------------------------------------------------- versions


def test_version_text_and_known() -> None:
    v = RosterVersion("abc", 7, 3)
    assert str(v) == "abc-7"
    assert v.known("abc-7") == 7
    assert v.known("abc-3") == 3
    assert v.known("abc-2") is None  # older than the change log reaches
    assert v.known("abc-8") is None  # from the future
    assert v.known("xyz-5") is None  # another epoch (store lost, other account)
    for bad in ("", None, "abc", "abc-", "abc-x", "abc-05", "abc--5", "7"):
        assert v.known(bad) is None


def test_first_full_roster_is_one_version_and_the_floor() -> None:
    store = Store(":memory:", new_epoch=epochs())
    v = store.roster.replace(A, [item("a@x"), item("b@x", "G")])
    assert (v.seq, v.floor) == (1, 1)
    assert store.roster.changes_since(A, 1) == []
    assert store.roster.changes_since(A, 0) is None  # nobody can hold version 0
    assert [i.jid for i in store.roster.items(A)] == ["a@x", "b@x"]


def test_diff_gives_one_version_per_changed_item_in_order() -> None:
    store = Store(":memory:", new_epoch=epochs())
    store.roster.replace(A, [item("a@x"), item("b@x", "G"), item("c@x")])
    v = store.roster.replace(A, [item("a@x"), item("b@x", "H"), item("d@x")])
    assert v.seq == 4
    assert store.roster.changes_since(A, 1) == [(2, "b@x"), (3, "d@x"), (4, "c@x")]
    assert store.roster.item(A, "c@x") is None
    assert store.roster.item(A, "b@x") == item("b@x", "H")
    # no difference: no new version
    assert store.roster.replace(A, store.roster.items(A)).seq == 4


def test_versions_never_repeat_even_when_content_returns() -> None:
    store = Store(":memory:", new_epoch=epochs())
    seen = {str(store.roster.replace(A, []))}
    for _ in range(3):
        for changes in ([("a@x", item("a@x"))], [("a@x", None)]):
            v = str(store.roster.update(A, changes))
            assert v not in seen
            seen.add(v)
    assert store.roster.items(A) == []
    # the log keeps the latest change of each jid only
    assert store.roster.changes_since(A, 1) == [(7, "a@x")]


def test_update_skips_no_ops() -> None:
    store = Store(":memory:", new_epoch=epochs())
    store.roster.replace(A, [item("a@x", "G")])
    assert store.roster.update(A, [("a@x", item("a@x", "G"))]).seq == 1
    assert store.roster.update(A, [("zz@x", None)]).seq == 1  # removing nothing
    assert store.roster.update(A, [("a@x", item("a@x", "G", "H"))]).seq == 2


def test_touch_makes_a_version_without_content_change() -> None:
    store = Store(":memory:", new_epoch=epochs())
    store.roster.replace(A, [item("a@x"), item("b@x")])
    assert store.roster.touch(A, ["b@x", "nobody@x"]).seq == 2
    assert store.roster.changes_since(A, 1) == [(2, "b@x")]


def test_change_log_is_bounded_and_raises_the_floor() -> None:
    store = Store(":memory:", new_epoch=epochs())
    store.roster.replace(A, [], max_changes=3)
    for n in range(5):
        store.roster.update(A, [(f"c{n}@x", item(f"c{n}@x"))], max_changes=3)
    v = store.roster.version(A)
    assert (v.seq, v.floor) == (6, 3)
    assert store.roster.changes_since(A, 3) == [(4, "c2@x"), (5, "c3@x"), (6, "c4@x")]
    assert store.roster.changes_since(A, 2) is None
    assert v.known("e1-2") is None and v.known("e1-3") == 3
    count = store.conn.execute("SELECT count(*) FROM roster_changes").fetchone()[0]
    assert count == 3


def test_zero_max_changes_keeps_no_log() -> None:
    store = Store(":memory:", new_epoch=epochs())
    store.roster.replace(A, [], max_changes=0)
    v = store.roster.update(A, [("a@x", item("a@x"))], max_changes=0)
    assert (v.seq, v.floor) == (2, 2)
    assert store.roster.changes_since(A, 1) is None


def test_accounts_are_separate() -> None:
    store = Store(":memory:", new_epoch=epochs())
    store.roster.replace(A, [item("a@x")])
    store.roster.replace(B, [item("b@x")])
    store.roster.add_preapproval(A, "p@x")
    assert [i.jid for i in store.roster.items(B)] == ["b@x"]
    assert store.roster.version(A).epoch != store.roster.version(B).epoch
    assert store.roster.preapprovals(B) == set()
    store.roster.forget(A)
    assert store.roster.items(A) == [] and store.roster.preapprovals(A) == set()
    assert store.roster.version(A).epoch not in ("e1", "e2")  # a new epoch: no repeat


def test_groups_order_names_and_non_ascii_round_trip() -> None:
    store = Store(":memory:")
    items = [
        item("a@x", "Zeta", "alpha", "Mitte", name="Ann"),
        item("b@x"),
        item("jürgen@exämple.de", "Fréunde", "家族", "😀 emoji", name="Jürgen ☃"),
        item("c@x", " spaced ", name=""),
        item("d@x", sub="to", ask="subscribe"),
    ]
    store.roster.replace(A, items)
    assert store.roster.items(A) == items
    assert store.roster.item(A, "jürgen@exämple.de") == items[2]


def test_item_order_is_first_appearance() -> None:
    store = Store(":memory:")
    store.roster.replace(A, [item("b@x"), item("a@x")])
    store.roster.update(A, [("c@x", item("c@x")), ("b@x", item("b@x", "G"))])
    assert [i.jid for i in store.roster.items(A)] == ["b@x", "a@x", "c@x"]


def test_preapprovals() -> None:
    store = Store(":memory:")
    assert store.roster.add_preapproval(A, "p@x") is True
    assert store.roster.add_preapproval(A, "p@x") is False
    assert store.roster.preapprovals(A) == {"p@x"}
    assert store.roster.remove_preapproval(A, "p@x") is True
    assert store.roster.remove_preapproval(A, "p@x") is False


# ---------------------------------------------------------------- persistence


def test_everything_survives_reopening_the_file(tmp_path: Path) -> None:
    path = str(tmp_path / "front.sqlite3")
    store = Store(path)
    store.roster.replace(A, [item("a@x", "G1", "G2", name="Ä"), item("b@x")], max_changes=10)
    store.roster.update(A, [("b@x", None), ("c@x", item("c@x", "家族"))], max_changes=10)
    store.roster.add_preapproval(A, "p@x")
    before = store.roster.version(A)
    items = store.roster.items(A)
    store.close()

    store = Store(path)
    assert store.roster.version(A) == before
    assert store.roster.items(A) == items
    assert store.roster.changes_since(A, 1) == [(2, "b@x"), (3, "c@x")]
    assert store.roster.preapprovals(A) == {"p@x"}
    # the counter goes on from where it was: versions never repeat across restarts
    after = store.roster.update(A, [("b@x", item("b@x"))], max_changes=10)
    assert after.epoch == before.epoch and after.seq == before.seq + 1
    store.close()


def test_epochs_are_random_by_default() -> None:
    one, two = Store(":memory:"), Store(":memory:")
    assert one.roster.version(A).epoch != two.roster.version(A).epoch


def test_bad_epoch_source_is_refused() -> None:
    store = Store(":memory:", new_epoch=lambda: "has-dash")
    with pytest.raises(StoreError):
        store.roster.version(A)


# ---------------------------------------------------------------- the roster book and the writer


def test_roster_writes_do_not_wait_for_a_locked_database(tmp_path: Path) -> None:
    """The roster is read from memory and written by the store's writer thread: a database
    locked by someone else holds up neither (the writes land once the lock is gone)."""
    path = str(tmp_path / "s.sqlite3")
    store = Store(path, new_epoch=epochs())
    book = store.roster.open(A)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        v = book.replace([item("a@x", "G"), item("b@x")])
        v = book.update([("c@x", item("c@x"))])
        assert book.add_preapproval("p@x") is True
        assert str(v) == "e1-2" and [i.jid for i in book.items()] == ["a@x", "b@x", "c@x"]
        assert book.changes_since(1) == [(2, "c@x")]
        assert store.writer.committed < store.writer.submitted  # still queued
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.roster.release(A)
    store.close()
    again = Store(path, new_epoch=epochs())
    assert str(again.roster.version(A)) == "e1-2"
    assert [i.jid for i in again.roster.items(A)] == ["a@x", "b@x", "c@x"]
    assert again.roster.changes_since(A, 1) == [(2, "c@x")]
    assert again.roster.preapprovals(A) == {"p@x"}
    again.close()


def test_a_released_book_is_kept_until_its_writes_are_committed(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite3")
    store = Store(path, new_epoch=epochs())
    book = store.roster.open(A)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    book.replace([item("a@x")])
    store.roster.release(A)
    # the next login of the account must not read the database behind the queued writes
    assert store.roster.open(A) is book
    store.roster.release(A)
    blocker.execute("ROLLBACK")
    blocker.close()
    store.writer.flush()
    fresh = store.roster.open(A)
    assert fresh is not book and [i.jid for i in fresh.items()] == ["a@x"]
    assert fresh.version == book.version
    store.close()


def test_after_a_crash_each_account_gets_a_new_epoch(tmp_path: Path) -> None:
    """Writes in flight at a crash may be lost: a version of the old epoch could then name
    two rosters, so the first book of the next run starts a new epoch (full roster once)."""
    path = str(tmp_path / "s.sqlite3")
    store = Store(path, new_epoch=epochs())
    store.roster.replace(A, [item("a@x"), item("b@x")])
    store.roster.update(A, [("c@x", item("c@x"))])
    store.writer.flush()
    before = store.roster.version(A)  # the process dies here: no close()

    crashed = Store(path, new_epoch=lambda: "after")
    v = crashed.roster.version(A)
    assert v.epoch == "after" and v.seq == before.seq
    assert v.known(str(before)) is None and crashed.roster.changes_since(A, 1) is None
    assert [i.jid for i in crashed.roster.items(A)] == ["a@x", "b@x", "c@x"]
    assert crashed.roster.version(A) == v  # once per run, not per look
    crashed.close()
    clean = Store(path, new_epoch=lambda: "never")
    assert clean.roster.version(A) == v  # a clean stop keeps the epoch
    clean.close()


def test_a_reloaded_book_equals_the_one_that_wrote_it(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite3")
    store = Store(path, new_epoch=epochs())
    book = store.roster.open(A)
    book.replace([item("a@x", "G1"), item("b@x"), item("c@x", name="C")], max_changes=3)
    for n in range(6):
        book.update([(f"n{n}@x", item(f"n{n}@x", f"G{n}"))], max_changes=3)
    book.update([("b@x", None), ("a@x", item("a@x", "G2", "G1"))], max_changes=3)
    book.update([("b@x", item("b@x", sub="both"))], max_changes=3)  # back, now last
    book.touch(["c@x", "nobody@x"], max_changes=3)
    book.add_preapproval("p@x")
    book.add_preapproval("q@x")
    book.remove_preapproval("p@x")
    store.roster.release(A)
    store.close()
    again = Store(path)
    loaded = again.roster.open(A)
    assert loaded.version == book.version and loaded.populated
    assert loaded.items() == book.items()
    assert [i.jid for i in loaded.items()][-1] == "b@x"
    assert loaded.changes_since(loaded.version.floor) == book.changes_since(book.version.floor)
    assert loaded.preapprovals() == {"q@x"}
    again.close()


# ---------------------------------------------------------------- push and blocklist writes


def _on_disk(path: str, sql: str, *params: object) -> list[tuple[object, ...]]:
    """What another connection (another process, the next run) reads."""
    other = sqlite3.connect(path)
    try:
        return [tuple(r) for r in other.execute(sql, params).fetchall()]
    finally:
        other.close()


def test_blocks_and_push_registrations_do_not_wait_for_a_locked_database(
        tmp_path: Path) -> None:
    """Written by the store's writer thread, like the roster: a database locked by someone
    else holds up neither the block nor the registration (a write on the loop would wait
    for the lock and then fail), and the area's own reads see them at once."""
    from proxy.features.push import Registration
    path = str(tmp_path / "s.sqlite3")
    store = Store(path)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        store.blocklist.add(A, ["evil@x", "spam.example"])
        store.push.save(A, Registration("push.example", "N1", b"<x/>"))
        assert store.writer.committed < store.writer.submitted  # still queued
        assert store.blocklist.items(A) == {"evil@x", "spam.example"}
        assert store.push.registrations(A) == [Registration("push.example", "N1", b"<x/>")]
        assert store.blocklist.items(B) == set() and store.push.registrations(B) == []
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.writer.flush()
    assert _on_disk(path, "SELECT jid FROM blocklist ORDER BY jid") == [
        ("evil@x",), ("spam.example",)]
    assert _on_disk(path, "SELECT jid, node FROM push_registrations") == [
        ("push.example", "N1")]
    store.close()


def test_reads_before_the_commit_apply_the_queued_changes_in_order(tmp_path: Path) -> None:
    from proxy.features.push import Registration
    path = str(tmp_path / "s.sqlite3")
    store = Store(path)
    store.blocklist.add(A, ["old@x", "keep@x"])
    store.push.save(A, Registration("a.example", "1"))
    store.push.save(A, Registration("b.example", "1"))
    store.writer.flush()
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        store.blocklist.remove(A, ["old@x"])
        store.blocklist.add(A, ["new@x", "old@x"])
        store.blocklist.clear(A)
        store.blocklist.add(A, ["last@x"])
        assert store.blocklist.items(A) == {"last@x"}
        store.push.save(A, Registration("a.example", "1", b"<renewed/>"))  # moves to the end
        store.push.save(A, Registration("c.example", "2"))
        store.push.delete(A, "b.example")
        store.push.delete(A, "c.example", "other-node")  # matches nothing
        assert [(r.jid, r.options) for r in store.push.registrations(A)] == [
            ("a.example", b"<renewed/>"), ("c.example", None)]
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.writer.flush()
    # Committed now: the database says the same as the reads did.
    assert _on_disk(path, "SELECT jid FROM blocklist WHERE account = ?", A) == [("last@x",)]
    assert _on_disk(path, "SELECT jid, options FROM push_registrations ORDER BY id") == [
        ("a.example", b"<renewed/>"), ("c.example", None)]
    assert store.blocklist.items(A) == {"last@x"}
    assert [r.jid for r in store.push.registrations(A)] == ["a.example", "c.example"]
    store.close()


def test_a_committed_block_survives_a_crash_and_the_next_run_says_it_was_unclean(
        tmp_path: Path) -> None:
    """The guarantee: a block is on disk with the writer's next batch; a crash after that
    loses nothing, and the next run knows its predecessor did not close the store."""
    path = str(tmp_path / "s.sqlite3")
    first = Store(path)
    assert first.unclean is False  # a new file: nothing was lost
    first.blocklist.add(A, ["evil@x"])
    first.writer.flush()  # the batch is committed; the process dies here: no close()
    crashed = Store(path)
    assert crashed.unclean is True
    assert crashed.blocklist.items(A) == {"evil@x"}
    crashed.close()
    clean = Store(path)
    assert clean.unclean is False and clean.blocklist.items(A) == {"evil@x"}
    clean.close()


# ---------------------------------------------------------------- the writer tells the loop


def _refuse_blocks(path: str) -> None:
    """Fault injection: every insert into the blocklist fails (as a full disk would)."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("CREATE TRIGGER refuse BEFORE INSERT ON blocklist"
                  " BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    other.close()


def _allow_blocks(path: str) -> None:
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("DROP TRIGGER refuse")
    other.close()


def test_the_writer_tells_the_loop_once_what_was_queued_is_committed(tmp_path: Path) -> None:
    """``when_committed``: called on the loop after the writer's thread committed every
    write handed to it before (not at the submit: the database is locked meanwhile)."""
    import asyncio
    path = str(tmp_path / "s.sqlite3")
    store = Store(path)

    async def main() -> list[str]:
        heard: list[str] = []
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        store.blocklist.add(A, ["evil@x"])
        store.writer.when_committed(lambda: heard.append(
            "first" if _on_disk(path, "SELECT jid FROM blocklist WHERE jid = 'evil@x'")
            else "first, not on disk"), lambda error: heard.append("failed"))
        store.blocklist.add(A, ["spam.example"])
        store.writer.when_committed(lambda: heard.append("second"),
                                    lambda error: heard.append("failed"))
        await asyncio.sleep(0.3)
        assert heard == []  # the writer waits for the lock: nothing is promised yet
        blocker.execute("ROLLBACK")
        blocker.close()
        for _ in range(200):
            if len(heard) == 2:
                break
            await asyncio.sleep(0.02)
        # Nothing waits any more: at once, before returning.
        store.writer.when_committed(lambda: heard.append("now"), lambda error: None)
        return heard
    # In order, and the row was on disk when the first one heard.
    assert asyncio.run(main()) == ["first", "second", "now"]
    store.close()


def test_a_failed_commit_tells_the_waiters_and_is_tried_again(tmp_path: Path) -> None:
    import asyncio
    path = str(tmp_path / "s.sqlite3")
    store = Store(path)
    _refuse_blocks(path)

    async def main() -> tuple[list[str], list[str]]:
        first: list[str] = []
        store.blocklist.add(A, ["evil@x"])
        store.writer.when_committed(lambda: first.append("done"), first.append)
        for _ in range(200):
            if first:
                break
            await asyncio.sleep(0.02)
        assert store.writer.committed < store.writer.submitted  # not given up
        _allow_blocks(path)
        later: list[str] = []
        store.writer.when_committed(lambda: later.append("done"), later.append)
        for _ in range(300):
            if later:
                break
            await asyncio.sleep(0.02)
        return first, later
    first, later = asyncio.run(main())
    assert len(first) == 1 and "refused by the test" in first[0]  # heard once: the error
    assert later == ["done"]  # the writer tried again, in order, and it is on disk
    assert _on_disk(path, "SELECT jid FROM blocklist") == [("evil@x",)]
    store.close()
