"""The L2 walk's memo: what counting one L2 table's references does, keyed by the table's bytes, for tables with nothing to report.

calculate_refcounts walks every L2 table of every crash image, and of every crash of a
recovery: thousands of tables per sweep with 512-byte clusters, nearly all of them
byte-identical to a table walked before (a crash changes a few metadata clusters, a
refcount repair none of the L2 tables). Walking a table (`refcounts.check_refcounts_l2`)
is a pure function of its bytes, the cluster size and the active injected bugs, of the
file's size and of the counts already in the IMRT: past-EOF references, IMRT growth and
saturated counts take the walk's slow branches.

So only a *plain* table is remembered: every non-zero entry uncompressed, free of
reserved bits, referencing an aligned cluster or nothing, and no cluster twice. Its walk
prints nothing, writes nothing, counts its allocated and fragmented clusters and adds
one to each referenced cluster's count. `replay` does exactly that, and only where the
walk would have taken its common branch for every entry: every referenced cluster
inside the file and inside the IMRT, every count it raises below refcount_max.
Otherwise it declines and the walk runs as written.

Hazards: the memo is process-wide and bounded (least recently used first, by entries and
by the clusters held). A table up to `_MAX_KEY_BYTES` is its own key; a larger one is
keyed by its XXH3-128 digest (a collision would replay another table's references: about
2**-64 over a night, as the judge's image memo accepts).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import repeat

import xxhash

from models.qcow2 import inject, spec

_MAX_ENTRIES = 16384
_MAX_CLUSTERS = 1 << 18  # referenced clusters held over all plans, at most (about 20 MiB)
_MAX_KEY_BYTES = 4096

_BAD = spec.QCOW_OFLAG_COMPRESSED | spec.L2E_STD_RESERVED_MASK
_OFFSET_MASK = spec.L2E_OFFSET_MASK

_memo: OrderedDict[tuple, tuple] = OrderedDict()  # () for a table that is not plain
stats = {"hits": 0, "misses": 0, "declined": 0, "clusters": 0}


def clear() -> None:
    _memo.clear()
    stats["clusters"] = 0


def key(cs: int, table: bytes) -> tuple:
    """The memo key of an L2 table's bytes."""
    content = table if len(table) <= _MAX_KEY_BYTES else xxhash.xxh3_128_digest(table)
    return (inject.active(), cs, content)


def lookup(k: tuple) -> tuple | None:
    """The plan remembered for key `k`: None when the table was not seen, () when it is not plain."""
    plan = _memo.get(k)
    if plan is not None:
        _memo.move_to_end(k)
    return plan


def remember(k: tuple, cs: int, items: list[tuple[int, int]]) -> None:
    """Note the plan of the table whose non-zero (index, entry) items are `items`, if it is plain."""
    stats["misses"] += 1
    plan = _plan(cs, items)
    _memo[k] = plan
    stats["clusters"] += len(plan[0]) if plan else 0
    while len(_memo) > _MAX_ENTRIES or stats["clusters"] > _MAX_CLUSTERS:
        _old, dropped = _memo.popitem(last=False)
        stats["clusters"] -= len(dropped[0]) if dropped else 0


def _plan(cs: int, items: list[tuple[int, int]]) -> tuple:
    """(clusters, highest cluster, allocated, fragmented) of a plain table; () for any other."""
    if any(entry & _BAD for _i, entry in items):
        return ()
    refs = [entry & _OFFSET_MASK for _i, entry in items]
    refs = [offset for offset in refs if offset]
    if any(offset & (cs - 1) for offset in refs):
        return ()
    clusters = tuple(offset // cs for offset in refs)
    if len(set(clusters)) != len(clusters):
        return ()
    # The walk's fragmentation counters: a cluster not right after the previous one counted.
    fragmented = sum(map(int.__ne__, refs[1:], map((cs).__add__, refs[:-1])))
    return (clusters, max(clusters, default=-1), len(refs), fragmented)


def replay(s, imrt, plan: tuple, frag: bool) -> bool:
    """Apply a plain table's walk to `imrt` and `s.res`; False (nothing changed) where the walk would branch."""
    clusters, highest, allocated, fragmented = plan
    if highest >= imrt.size or highest * s.cs >= s.file.size() or imrt.ordered:
        stats["declined"] += 1
        return False  # past EOF or past the IMRT: the walk reports or grows
    counts = imrt.counts
    raised = None
    if not counts.keys().isdisjoint(clusters):  # (clusters a snapshot's tables share)
        raised = [(c, counts[c] + 1) for c in clusters if c in counts]
        if max(v for _c, v in raised) > s.refcount_max:
            stats["declined"] += 1
            return False  # a count saturates: the walk reports the overflow
    counts.update(zip(clusters, repeat(1)))
    if raised:
        counts.update(raised)
    imrt.changed()
    if frag:
        res = s.res
        res.allocated_clusters += allocated
        res.fragmented_clusters += fragmented
    stats["hits"] += 1
    return True
