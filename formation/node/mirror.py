"""Copies of some kinds' records that a node's loops read often (the DNS zone, placement), kept
up to date by reading only the records changed since the last read (the store's `updated_seq`).

Read whole on every pass, the records cost each node a JSON parse apiece per pass: the DNS view
took ~45 % of a node's time in the 500 ops/s gossip bench with 5,000 models, and the scheduler
read every instance and status at each of its passes (one per commit, 0.3 s apart at most). The
records handed out are shared between reads: callers must not change them.
"""

from __future__ import annotations

import weakref

READ_PAGE = 10_000  # changed records read in one store call


class RecordMirror:
    """A copy of the records of some kinds. A kind over `cap` records keeps its first `cap` by
    key, as a whole read would; a record of such a kind gone makes the next read start over
    (the one past the cap that moves up is not in the copy)."""

    def __init__(self, kinds: tuple[str, ...], cap: int):
        self.kinds, self.cap = kinds, cap
        self._reset()

    def _reset(self) -> None:
        self.records: dict[str, dict[str, dict]] = {k: {} for k in self.kinds}
        self.lists: dict[str, list[dict]] = {k: [] for k in self.kinds}  # by key, as read last
        self.seq = 0  # the store's seq up to which the copy is read
        self.capped: set[str] = set()

    def read(self, store) -> dict[str, list[dict]]:
        """kind -> its records by key, as the store holds them now (call it with the store's
        lock held: AsyncStore.run)."""
        changed: set[str] = set()
        while True:
            rows = store.changed_records(self.kinds, self.seq, READ_PAGE)
            for kind, key, record, seq in rows:
                self.seq = max(self.seq, seq)
                kept = self.records[kind]
                changed.add(kind)
                if record is not None:
                    kept[key] = record
                elif kept.pop(key, None) is not None and kind in self.capped:
                    self._reset()  # the first `cap` keys changed: read them all again
                    return self.read(store)
            for kind in changed:
                kept = self.records[kind]
                if len(kept) > self.cap:
                    self.capped.add(kind)
                    for key in sorted(kept)[self.cap:]:
                        del kept[key]
            if len(rows) < READ_PAGE:
                break
        for kind in changed:
            kept = self.records[kind]
            self.lists[kind] = [kept[key] for key in sorted(kept)]
        return dict(self.lists)


_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_mirror(store, kinds: tuple[str, ...], cap: int) -> RecordMirror:
    """The one mirror of these kinds over this store (all of a node's readers of them share it)."""
    mirrors = _shared.setdefault(store, {})
    key = (kinds, cap)
    if key not in mirrors:
        mirrors[key] = RecordMirror(kinds, cap)
    return mirrors[key]
