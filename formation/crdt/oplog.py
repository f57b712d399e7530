"""The op log in SQLite: append-only ops, the records projection, and their queries.

One transaction per batch (`commit`), so the log and the projection never disagree; WAL with
synchronous=FULL by default, so an acknowledged batch survives power loss. The log is in op
format 2 (`FORMAT`); a data directory holding another format is refused with what to do, never
migrated (format 1 trusted values its successor refuses).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

FORMAT = b"2"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ops(
  seq INTEGER PRIMARY KEY,
  id BLOB NOT NULL,  -- unique by construction (checked in memory); no index: random keys are costly
  kind TEXT NOT NULL,
  key TEXT NOT NULL,
  author BLOB NOT NULL,
  hlc INTEGER NOT NULL,
  deps BLOB NOT NULL,
  prev BLOB NOT NULL,
  write_id BLOB,
  signer BLOB,  -- the user who signed the request an op carries (recovered once, when stored)
  wire BLOB NOT NULL,
  value BLOB
);
CREATE TABLE IF NOT EXISTS records(
  kind TEXT NOT NULL,
  key TEXT NOT NULL,
  heads BLOB NOT NULL,
  version TEXT NOT NULL,
  doc TEXT,
  owner TEXT,
  type TEXT,
  text TEXT,
  updated_seq INTEGER NOT NULL,
  over_quota TEXT,  -- why the record is inert (crdt/quotas.py); NULL: it takes effect
  PRIMARY KEY(kind, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS records_owner ON records(kind, owner);
CREATE INDEX IF NOT EXISTS records_type ON records(kind, type);
-- what changed since a reader last looked (Store.changed_records: the DNS view reads only that)
CREATE INDEX IF NOT EXISTS records_updated ON records(updated_seq);
-- claims and seals of a fog found by their inviter (Store.fog_members walks the invite tree)
CREATE INDEX IF NOT EXISTS records_inviter ON records(kind, type, json_extract(doc, '$.invite.inviter'));
CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v BLOB);
"""

_UPSERT_RECORD = (
    "INSERT INTO records(kind,key,heads,version,doc,owner,type,text,updated_seq,over_quota) "
    "VALUES (?,?,?,?,?,?,?,?,?,?) "
    "ON CONFLICT(kind,key) DO UPDATE SET heads=excluded.heads, version=excluded.version, doc=excluded.doc, "
    "owner=excluded.owner, type=excluded.type, text=excluded.text, updated_seq=excluded.updated_seq, "
    "over_quota=excluded.over_quota")


class LogFormatError(RuntimeError):
    """The data directory holds an op log this version cannot read."""


class OpLog:
    def __init__(self, path: str = ":memory:", *, synchronous: str = "FULL"):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged batch survives power loss.
        self.db.execute(f"PRAGMA synchronous={synchronous}")
        self._check_format()
        # the tables and the format mark in one transaction: a process killed in between left a
        # log with tables and no mark, which the next start refused as format 1 (test_crash.py)
        self.db.executescript(
            f"BEGIN;\n{_SCHEMA}\nINSERT INTO meta(k, v) VALUES('format', X'{FORMAT.hex()}') "
            "ON CONFLICT(k) DO UPDATE SET v = excluded.v;\nCOMMIT;\n")
        # a log from before quotas: the column is added here and filled by the load's re-derivation
        if "over_quota" not in {r[1] for r in self.db.execute("PRAGMA table_info(records)")}:
            self.db.execute("ALTER TABLE records ADD COLUMN over_quota TEXT")

    def _check_format(self) -> None:
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "ops" not in tables:
            return
        fmt = None
        if "meta" in tables:
            row = self.db.execute("SELECT v FROM meta WHERE k = 'format'").fetchone()
            fmt = row[0] if row else None
        if fmt != FORMAT:
            raise LogFormatError(
                f"{self.path} holds an op log of format {fmt.decode() if fmt else 1}; this Formation writes "
                f"format {FORMAT.decode()} and does not migrate (older logs trusted values it now refuses). "
                "Move the file (or the whole data directory) away and start again: the node re-syncs the "
                "fog's state from its peers.")

    def close(self) -> None:
        self.db.close()

    # ---- writing ----------------------------------------------------------------------------

    def commit(self, op_rows: list[tuple], record_rows: Iterable[tuple],
               quota_flips: Iterable[tuple] = ()) -> None:
        """Append ops, upsert records and set other records' quota standing ((why, seq, kind,
        key): a flip moves the record's updated_seq too) in one transaction (all or nothing)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT INTO ops VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", op_rows)
            self.db.executemany(_UPSERT_RECORD, record_rows)
            self.db.executemany("UPDATE records SET over_quota = ?, updated_seq = ? "
                                "WHERE kind = ? AND key = ? AND doc IS NOT NULL", quota_flips)
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def get_meta(self, k: str) -> bytes | None:
        row = self.db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, k: str, v: bytes) -> None:
        self.db.execute("INSERT INTO meta(k, v) VALUES(?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v", (k, v))

    # ---- reading ----------------------------------------------------------------------------

    def metas(self) -> Iterator[tuple]:
        """(seq, id, kind, key, author, hlc, deps, prev, write_id) of every op, in delivery order."""
        yield from self.db.execute("SELECT seq,id,kind,key,author,hlc,deps,prev,write_id FROM ops ORDER BY seq")

    def user_ops(self, kinds: list[str]) -> Iterator[tuple[bytes, bytes, bytes]]:
        """(wire, author, signer) of the ops on records of `kinds`, in delivery order."""
        if not kinds:
            return
        q = "SELECT wire, author, signer FROM ops WHERE kind IN ({}) ORDER BY seq".format(",".join("?" * len(kinds)))
        yield from self.db.execute(q, kinds)

    def record_heads(self, kinds: list[str]) -> Iterator[tuple[str, str, bytes]]:
        if not kinds:
            return
        q = "SELECT kind, key, heads FROM records WHERE kind IN ({})".format(",".join("?" * len(kinds)))
        yield from self.db.execute(q, kinds)

    def record_versions(self) -> dict[tuple[str, str], tuple[str, str | None, str | None]]:
        return {(k, key): (v, d, q) for k, key, v, d, q in
                self.db.execute("SELECT kind, key, version, doc, over_quota FROM records")}

    def values(self, seqs: list[int]) -> Iterator[tuple[int, Any]]:
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            q = "SELECT seq, value FROM ops WHERE seq IN ({})".format(",".join("?" * len(chunk)))
            for seq, blob in self.db.execute(q, chunk):
                yield seq, None if blob is None else msgpack.unpackb(blob, raw=False)  # our own bytes

    def wires(self, seqs: list[int]) -> list[bytes]:
        """Wires of ops by seq, in seq order."""
        out = []
        seqs = sorted(seqs)
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            q = "SELECT wire FROM ops WHERE seq IN ({}) ORDER BY seq".format(",".join("?" * len(chunk)))
            out.extend(w for (w,) in self.db.execute(q, chunk))
        return out

    def all_wires(self) -> Iterator[bytes]:
        for (w,) in self.db.execute("SELECT wire FROM ops ORDER BY seq"):
            yield w

    def invited_by(self, kind: str, fog_id: str, inviters: list[str], limit: int) -> list[dict]:
        """The records of `kind` (member claims, admit seals) of fog `fog_id` whose invite one of
        `inviters` signed: for each inviter its first `limit` in key order (records_inviter)."""
        out: list[dict] = []
        for i in range(0, len(inviters), 500):  # SQLite's bound on parameters
            chunk = inviters[i:i + 500]
            marks = ",".join("?" * len(chunk))
            rows = self.db.execute(
                "SELECT doc FROM (SELECT doc, ROW_NUMBER() OVER (PARTITION BY json_extract(doc, '$.invite.inviter') "
                "ORDER BY key) AS n FROM records WHERE kind = ? AND type = ? AND doc IS NOT NULL "
                f"AND over_quota IS NULL AND json_extract(doc, '$.invite.inviter') IN ({marks})) WHERE n <= ?",
                (kind, fog_id, *chunk, limit))
            out += [json.loads(d) for (d,) in rows]
        return out

    def owned_written_by(self, kind: str, owner: str, node: str, limit: int) -> list[dict]:
        """The records of `kind` indexed under `owner` whose key ends in `@<node>` (a node
        record of that node's), at most `limit` (records_owner narrows it to the owner's)."""
        suffix = "%@" + node.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = self.db.execute("SELECT doc FROM records WHERE kind = ? AND owner = ? AND doc IS NOT NULL "
                               "AND key LIKE ? ESCAPE '\\' LIMIT ?", (kind, owner.lower(), suffix, limit))
        return [json.loads(d) for (d,) in rows]

    def docs(self, kind: str, keys: list[str]) -> list[dict]:
        """The records of `kind` under `keys` that exist (in no particular order)."""
        out: list[dict] = []
        for i in range(0, len(keys), 500):
            chunk = keys[i:i + 500]
            rows = self.db.execute(f"SELECT doc FROM records WHERE kind = ? AND doc IS NOT NULL AND key IN "
                                   f"({','.join('?' * len(chunk))})", (kind, *chunk))
            out += [json.loads(d) for (d,) in rows]
        return out

    def changed(self, kinds: tuple[str, ...], after: int, limit: int) -> list[tuple]:
        """(kind, key, doc or None, over_quota, updated_seq) of the records of `kinds` changed
        after seq `after`, oldest change first, at most `limit`: doc None is a deleted record."""
        marks = ",".join("?" * len(kinds))
        return self.db.execute(
            f"SELECT kind, key, doc, over_quota, updated_seq FROM records INDEXED BY records_updated "
            f"WHERE updated_seq > ? AND kind IN ({marks}) ORDER BY updated_seq LIMIT ?",
            (after, *kinds, limit)).fetchall()

    def list(self, kind: str, *, owner: str | None = None, type: str | None = None,
             tag: str | None = None, text: str | None = None, limit: int = 100, offset: int = 0,
             over_quota: bool = False) -> list[dict]:
        """Records of a kind, each with its `record_version` (what a write names as its base).
        Records over their creator's quota (inert: crdt/quotas.py) only with `over_quota`, and
        then with the reason in their `over_quota`."""
        sql = ["SELECT doc, version, over_quota FROM records WHERE kind = ? AND doc IS NOT NULL"]
        if not over_quota:
            sql.append("AND over_quota IS NULL")
        args: list[Any] = [kind]
        if owner is not None:
            sql.append("AND owner = ?")
            args.append(owner.lower())
        if type is not None:
            sql.append("AND type = ?")
            args.append(type)
        if tag is not None:
            sql.append("AND EXISTS (SELECT 1 FROM json_each(doc, '$.tags') WHERE json_each.value = ?)")
            args.append(tag)
        if text:
            for word in text.lower().split():
                sql.append("AND text LIKE ? ESCAPE '\\'")
                args.append("%" + word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        sql.append("ORDER BY key LIMIT ? OFFSET ?")
        args += [limit, offset]
        return [{**json.loads(d), "record_version": v, **({"over_quota": q} if q else {})}
                for d, v, q in self.db.execute(" ".join(sql), args)]
