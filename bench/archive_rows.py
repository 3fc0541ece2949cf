"""The archive writer's cost per row inserted, counted under callgrind.

``python -m bench.archive_rows FILL_PATH``: a file of 100,000 rows of 50 accounts.
``python -m bench.archive_rows N PATH [--build-only]``: N more rows in commits of 125, as
the writer's thread inserts them (``ArchiveArea.insert``), into a copy of that file;
``--build-only`` makes the rows (ids and fields, as the loop does) without inserting them.
Under ``valgrind --tool=callgrind`` with N = 2000 and 8000, with and without
``--build-only``: the insert's instructions per row are the difference of the differences
over 6000 rows (docs/performance.md, "The archive's cost, step 3").
"""

from __future__ import annotations

import random
import sys

from proxy.archive_store import ArchiveArea, ArchivedMessage, open_archive_connection

ACCOUNTS = [f"user{i}@example.org" for i in range(50)]
CONTACTS = [f"contact{i}@example.net" for i in range(200)]
STANZA = b"<message xmlns='jabber:client' type='chat'><body>" + b"x" * 40 + b"</body></message>"


def batch(area: ArchiveArea, rng: random.Random, first: int, count: int) -> list[object]:
    values: list[object] = []
    for k in range(first, first + count):
        archive_id, seq, nonce = area.ids.new()
        contact = CONTACTS[rng.randrange(len(CONTACTS))]
        values.append(ACCOUNTS[rng.randrange(len(ACCOUNTS))])
        values += ArchivedMessage(archive_id, 1.7e9 + k * 0.01, "in" if k % 2 else "out",
                                  contact, contact + "/res", STANZA, seq, nonce)
    return values


def main(argv: list[str]) -> None:
    rng = random.Random(1)
    if len(argv) == 1:
        area = ArchiveArea(open_archive_connection(argv[0]))
        for k in range(0, 100_000, 5000):
            area.conn.execute("BEGIN")
            area.insert(batch(area, rng, k, 5000))
            area.conn.execute("COMMIT")
        return
    n, path = int(argv[0]), argv[1]
    area = ArchiveArea(open_archive_connection(path))
    for k in range(0, n, 125):
        values = batch(area, rng, 200_000 + k, 125)
        if "--build-only" in argv:
            continue
        area.conn.execute("BEGIN IMMEDIATE")
        area.insert(values)
        area.conn.execute("COMMIT")


if __name__ == "__main__":
    main(sys.argv[1:])
