"""QEMU's metadata overlap protection (qcow2_check_metadata_overlap, the "cached" template) and its fatal corruption events.

Before a host write lands, its range (rounded out to whole clusters) is compared with the
metadata: the header (cluster 0), the L1 table, the refcount table, the snapshot table,
every snapshot's L1 table (QEMU's "inactive L1"), every L2 table the active L1 points at
and every refcount block the refcount table points at (the L2 tables only snapshots reach
are not compared: "inactive L2" is outside the cached template). A hit is a fatal
corruption event: the image is marked corrupt and the write refused (see
`HostIO.signal_corruption`). Each write site skips its own kind, as QEMU's callers
pass an `ign` mask: an L2 write-back may land on an active L2 table, never on a refcount
block. Header updates (dirty bit, header rewrite, refcount-table switch) and refcount-table
hookups are not checked, as in QEMU. Of a snapshot operation's writes only the new snapshot
table is checked: its L1 writes share one write site across QEMU's differently masked
calls, and its cache write-backs happen while the L1 lists are being swapped.

The L2 and refcount-block cluster sets are cached and rebuilt only after a write that can
change them (L1 entry, refcount-table entry, table growth or switch, a snapshot operation's
L1 write, a new active L1 list); the snapshot table and its L1 ranges are read once (`load_snapshots`, which the
open calls, so a table QEMU's open refuses is refused there too) and again only after the
header is switched to a new table. A guest data write costs a few comparisons and two set
lookups.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.blockio import WriteSite
from models.qcow2 import inject, spec
from models.qcow2.errors import InvalidImage
from models.qcow2.header import cluster0_bytes
from models.qcow2.snaptable import read_table

if TYPE_CHECKING:
    from models.qcow2.image import Qcow2Image

# QEMU's names, as in its message "Preventing invalid write on metadata (overlaps with %s)".
OL_NAMES = {
    "header": "qcow2_header",
    "l1": "active L1 table",
    "l2": "active L2 table",
    "reftable": "refcount table",
    "refblock": "refcount block",
    "snapshots": "snapshot table",
    "inactive-l1": "inactive L1 table",
}

_ALL: frozenset[str] = frozenset()
# site -> the kinds of metadata it may overwrite (its ign mask); None = not checked.
_IGNORE: dict[WriteSite, frozenset[str] | None] = {
    WriteSite.DATA: _ALL,
    WriteSite.L2: frozenset({"l2"}),
    WriteSite.L2_ALLOC: frozenset({"l2"}),
    WriteSite.REFBLOCK: frozenset({"refblock"}),
    WriteSite.REFBLOCK_ALLOC: frozenset({"refblock"}),
    WriteSite.L1: frozenset({"l1"}),
    WriteSite.REFTABLE_GROW: _ALL,
    WriteSite.SNAPSHOT_TABLE: _ALL,  # qcow2_write_snapshots checks the new table's clusters against everything
}
# Writes after which the L2 / refcount-block sets may have changed.
_CHANGES_TABLES = frozenset({WriteSite.L1, WriteSite.REFTABLE, WriteSite.REFTABLE_GROW, WriteSite.REFTABLE_SWITCH,
                             WriteSite.SNAPSHOT_L1})
# Writes after which the snapshot table (and so the inactive L1 tables) may be another.
_CHANGES_SNAPSHOTS = frozenset({WriteSite.SNAPSHOT_HEADER})


class OverlapGuard:
    """The overlap check of one open image; reads the image's live L1, refcount table and header."""

    def __init__(self, image: "Qcow2Image") -> None:
        self.image = image
        self._tables: tuple[frozenset[int], frozenset[int]] | None = None
        self._l1_id = 0
        # (first, last) host clusters of the snapshot table, then of each non-empty snapshot L1 table.
        self._snapshots: tuple[tuple[int, int] | None, list[tuple[int, int]]] | None = None

    def invalidate(self) -> None:
        self._tables = None

    def after_write(self, site: WriteSite) -> None:
        if site in _CHANGES_TABLES:
            self._tables = None
        if site in _CHANGES_SNAPSHOTS:
            self._snapshots = None

    def load_snapshots(self) -> tuple[tuple[int, int] | None, list[tuple[int, int]]]:
        """The snapshot table's clusters and its L1 tables' (qcow2_read_snapshots: a bad table raises its named error)."""
        if self._snapshots is None:
            img = self.image
            hdr, bits = img.hdr, img.geo.cluster_bits
            table, size = read_table(img.file, hdr.nb_snapshots, hdr.snapshots_offset, disk_size=hdr.size) \
                if hdr.nb_snapshots else ([], 0)
            span = (lambda start, length: (start >> bits, (start + length - 1) >> bits))  # noqa: E731
            self._snapshots = (span(hdr.snapshots_offset, size) if size else None,
                               [span(sn.l1_table_offset, sn.l1_size * 8) for sn in table if sn.l1_size])
        return self._snapshots

    def _sets(self) -> tuple[frozenset[int], frozenset[int]]:
        if self._tables is None or self._l1_id != id(self.image.l1):
            # A snapshot apply replaces the active L1 list itself (hence the identity check).
            self._l1_id = id(self.image.l1)
            bits = self.image.geo.cluster_bits
            l2 = frozenset((e & spec.L1E_OFFSET_MASK) >> bits for e in self.image.l1 if e & spec.L1E_OFFSET_MASK)
            # (a 2 MiB-cluster refcount table is 262,144 entries with a few set: found by numpy, where even
            # itertools.compress made two ints of each, 1.5 ms a call)
            from models.qcow2.check.imrt import nonzero_values  # (the check package builds on this module)

            rb = frozenset((e & spec.REFT_OFFSET_MASK) >> bits for e in nonzero_values(self.image.reftable)
                           if e & spec.REFT_OFFSET_MASK)
            self._tables = (l2, rb)
        return self._tables

    def check(self, offset: int, size: int, site: WriteSite) -> str | None:
        """The kind of active metadata the write [offset, offset+size) would land on, or None."""
        ignore = _IGNORE.get(site)
        if ignore is None or size <= 0:
            return None
        img = self.image
        bits = img.geo.cluster_bits
        first, last = offset >> bits, (offset + size - 1) >> bits
        if first == 0 and "header" not in ignore:
            return "header"
        hdr = img.hdr
        if "l1" not in ignore and hdr.l1_size and _hits(first, last, hdr.l1_table_offset, hdr.l1_size * 8, bits):
            return "l1"
        if "reftable" not in ignore and img.reftable and _hits(first, last, img.reftable_offset, len(img.reftable) * 8, bits):
            return "reftable"
        if "snapshots" not in ignore or "inactive-l1" not in ignore:
            table, l1s = self.load_snapshots()
            if "snapshots" not in ignore and table and first <= table[1] and table[0] <= last:
                return "snapshots"
            if "inactive-l1" not in ignore and any(first <= hi and lo <= last for lo, hi in l1s):
                return "inactive-l1"
        l2, rb = self._sets()
        clusters = range(first, last + 1)
        if "l2" not in ignore and l2 and not l2.isdisjoint(clusters):
            return "l2"
        if "refblock" not in ignore and rb and not rb.isdisjoint(clusters):
            return "refblock"
        return None


def _hits(first: int, last: int, start: int, length: int, bits: int) -> bool:
    return first <= (start + length - 1) >> bits and start >> bits <= last


def corruption_event(img: "Qcow2Image", rule: str) -> None:
    """qcow2_signal_corruption: fatal on a writable image (log, corrupt bit by a header rewrite, stop); else logged once."""
    if img.readonly:
        if not img._corruption_logged:
            img.log(f"qcow2: Image is corrupt: {rule}; further non-fatal corruption events will be suppressed")
            img._corruption_logged = True
        return
    if img.dead:
        return
    img.log(f"qcow2: Marking image as corrupt: {rule}; further corruption events will be suppressed")
    img.hdr.incompatible_features |= int(spec.IncompatFeature.CORRUPT)
    try:
        cluster0 = cluster0_bytes(img.hdr, img.extensions)
    except InvalidImage:  # the header no longer fits cluster 0: QEMU's rewrite fails too
        cluster0 = None
    if cluster0 is not None:
        # qcow2_mark_corrupt rewrites the header (a v2 header cannot hold the bit); not through
        # the image's _pwrite, which a dead image refuses.
        img.file.pwrite(0, cluster0, WriteSite.HEADER)
        img.file.flush()
    img.dead = True


def swallowed(site: WriteSite) -> bool:
    """Injected error-handling bugs: a host write error forgotten, so the caller believes the write happened."""
    if site is WriteSite.DATA:
        return inject.on("eio-write-swallowed")
    if site in (WriteSite.L2, WriteSite.REFBLOCK):
        return inject.on("eio-metadata-writeback-swallowed")
    return False


def forget_failed_writeback(img: "Qcow2Image") -> None:
    """Injected bug eio-dirty-cleared-after-failed-flush: a failed write-back is forgotten (tables count as written)."""
    from models.qcow2.errors import HostIOError

    try:
        img._write_caches(force_refcounts=True)
        img._file_flush()
    except HostIOError:
        img.l2cache.dirty.clear()
        img.refcache.dirty.clear()


def c_hex(value: int) -> str:
    """C's %#x, as QEMU's messages print it: 0 is "0", not "0x0"."""
    return f"{value:#x}" if value else "0"
