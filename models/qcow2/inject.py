"""Switchable, named bugs in the qcow2 implementation, so the harness can prove every oracle can fail.

Bugs are selected by name through the environment variable QCRASH_INJECT
(`QCRASH_INJECT=dirty-no-flush,l2-before-refblock`) or `set_active()`; none is active
by default. A site asks `inject.on("name")`, a frozenset lookup that costs nothing
measurable when the set is empty.
"""

from __future__ import annotations

import os

# name -> the real-world mistake it stands for.
BUGS: dict[str, str] = {
    "dirty-no-flush": "dirty bit written but not flushed before the first postponed refcount update",
    "dirty-set-late": "dirty bit set after the L2 entry that postpones a refcount update, not before",
    "dirty-cleared-early": "clean close clears the dirty bit before the refcount blocks reach the disk",
    "dirty-not-cleared": "clean close forgets to clear the dirty bit (lazy image stays dirty forever)",
    "l2-before-refblock": "with accurate refcounts, the L2 table is written without waiting for the refcount block",
    "refcount-free-early": "a refcount decrement is written before the L2 entry that stopped referencing the cluster",
    "writethrough-no-flush": "cache=writethrough returns from a write before flushing it",
    "data-after-l2": "guest data written into a reused cluster is not flushed before the L2 entry that exposes it",
    "reuse-before-free-durable": "a freed cluster is reused before the L2 update that freed it is durable",
    "refblock-not-self-described": "a new self-describing refcount block does not count itself",
    "reftable-grow-loses-entry": "growing the refcount table drops the last entry of the old table",
    "refcount-index-off-by-one": "refcount update lands on the neighbouring cluster's entry",
    "copied-flag-wrong": "an allocating write links its data cluster without the COPIED flag",
    "repair-leaks-only": "repair on open fixes only leaks on an image whose refcounts need a rebuild",
    "rebuild-switch-before-durable": "refcount rebuild switches the header to the new table before the new structures are flushed",
    "repair-forgets-table": "refcount rebuild forgets to count the L1 table",
    "l2-alloc-no-flush": "a new L2 table is linked into the L1 before the table itself is durable",
    "stale-l2-entry-read": "reads trust the stale host offset of an L2 entry whose zero flag is set",
    "snapshot-copied-left-set": "snapshot create leaves COPIED set on shared data clusters (an in-place write changes the snapshot)",
    "snapshot-delete-no-decrement": "snapshot delete frees the snapshot's L1 but never drops the references its tree held (leak)",
    "snapshot-delete-double-decrement": "snapshot delete drops each data cluster's reference twice (use after free)",
    "snapshot-apply-stale-copied": "snapshot apply writes the snapshot's L1 with the COPIED flags it had when taken (QEMU 7.2's qcow2_snapshot_goto)",
    "snapshot-table-before-refcounts": "snapshot create publishes the snapshot table before the refcount increments are durable",
    # Bugs that show only at a structure edge (harness.ranges aims at these edges):
    "l2-crossing-write-one-table": "a write crossing an L2-table boundary maps its later clusters through the "
                                   "first table (no per-table clamp; the index wraps around)",
    "refblock-alloc-no-flush": "a new self-describing refcount block is hooked into the refcount table before "
                               "the block itself is durable",
    "discard-tail-whole-cluster": "a discard reaching the end of the disk drops its last cluster whole, even when "
                                  "the discard starts inside that cluster",
}
EDGE_BUGS = ("l2-crossing-write-one-table", "refblock-alloc-no-flush", "discard-tail-whole-cluster")
"""The bugs above that only an operation at a structure edge (L2 table, refcount block, disk end) can show."""

# Bugs of error handling: only host I/O errors reveal them, so the crash runner cannot;
# harness/errorsweep.py sweeps error points and finds them (kept apart from BUGS until the
# runner sweeps error points too).
ERROR_BUGS: dict[str, str] = {
    "eio-write-swallowed": "an EIO/ENOSPC on a guest data write is swallowed, so the write is reported done",
    "eio-metadata-writeback-swallowed": "a failed L2/refcount-block write-back is swallowed and the table counted "
                                        "as written (fsync-gate: the update is never retried)",
    "eio-dirty-cleared-after-failed-flush": "close clears the dirty bit although writing the refcount blocks or the "
                                            "flush before it failed",
}

_ACTIVE: frozenset[str] = frozenset()


def _parse(spec: str) -> frozenset[str]:
    names = frozenset(n.strip() for n in spec.split(",") if n.strip())
    known = BUGS.keys() | ERROR_BUGS.keys()
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(
            f"QCRASH_INJECT: unknown bug name(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return names


def set_active(names: str | list[str] | frozenset[str] | set[str] | None) -> None:
    global _ACTIVE
    if names is None:
        _ACTIVE = frozenset()
    elif isinstance(names, str):
        _ACTIVE = _parse(names)
    else:
        _ACTIVE = _parse(",".join(names))


def active() -> frozenset[str]:
    return _ACTIVE


def on(name: str) -> bool:
    return bool(_ACTIVE) and name in _ACTIVE


set_active(os.environ.get("QCRASH_INJECT", ""))
