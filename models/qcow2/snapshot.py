"""Internal snapshots of an open Qcow2Image: create, apply (revert), delete and list, in the order QEMU 7.2's qcow2-snapshot.c writes.

Hazards, each ordered as QEMU orders them:

- create: the snapshot's L1 copy is written, then every L2 table and data cluster the
  active L1 reaches gets one more reference (`update_refcounts`, which clears COPIED where a
  refcount leaves 1 and makes the L2 cache wait for the refcount cache), then the caches
  and the file are flushed, and only then is the new snapshot table written, flushed, and
  the header switched to it (12 bytes, one sector, synced). A crash before the switch
  leaves leaks, never a table entry whose references are not counted on disk.
- apply: the snapshot's clusters get one more reference and are flushed before the
  active L1 is overwritten (synced); the old active tree loses its reference afterwards,
  and COPIED is recomputed. A crash in between leaks, never frees something in use.
- delete: the table without the entry is switched in first; the references are dropped
  afterwards (a crash in between leaks).
- a refcount drop to zero discards the table from the L2 cache, so a freed L2 table is
  never written back over whatever reuses its cluster.
- COPIED is what lets a write go in place: it must be clear on every shared cluster, or
  an in-place write changes a snapshot too.

Deviations from QEMU, on purpose:

- a snapshot operation that would overflow a refcount (refcount_bits 1 or 2) is refused
  before anything is written; QEMU fails half way and leaks the clusters it had counted;
- apply writes the snapshot's L1 into the active L1 with COPIED cleared (see `apply`):
  QEMU 7.2 writes the flags as they were when the snapshot was taken, and a crash before
  its final COPIED pass leaves a shared L2 table writable in place (verified with
  blklogwrites: `qemu-img check` then reports "OFLAG_COPIED L2 cluster ... refcount=2" on
  an image whose dirty bit is clear). The injected bug `snapshot-apply-stale-copied`
  restores QEMU's behaviour.
"""

from __future__ import annotations

import contextlib
import struct
from collections import Counter
from typing import TYPE_CHECKING, Iterator

from models.blockio import WriteSite, read_exact
from models.qcow2 import inject, spec
from models.qcow2.entries import ClusterType, l2_cluster_type, set_entry
from models.qcow2.errors import CorruptImage, ImageNotWritable, InvalidRequest, UnsupportedFeature
from models.qcow2.scan import nonzero_u64_items
from models.qcow2.snaptable import Snapshot, read_table, table_bytes, validate_l1

if TYPE_CHECKING:
    from models.qcow2.image import Qcow2Image

_COPIED = spec.QCOW_OFLAG_COPIED


class SnapshotNotFound(InvalidRequest):
    """No snapshot has the id or name asked for (QEMU: ENOENT)."""


class SnapshotRefused(InvalidRequest):
    """A snapshot operation QEMU would refuse, or one qcrash refuses before writing (named reason)."""


# ---- listing and lookup ------------------------------------------------------------------
def list_snapshots(img: "Qcow2Image") -> list[Snapshot]:
    """The snapshot table as the header describes it now (QEMU's qcow2_snapshot_list order)."""
    return _read(img)[0]


def _read(img: "Qcow2Image") -> tuple[list[Snapshot], int]:
    hdr = img.hdr
    if not hdr.nb_snapshots:
        return [], 0
    return read_table(img.file, hdr.nb_snapshots, hdr.snapshots_offset, disk_size=hdr.size)


def find(snapshots: list[Snapshot], *, id_str: str | None = None, name: str | None = None) -> int:
    """Index of the first entry matching both given keys (QEMU's find_snapshot_by_id_and_name), or -1."""
    for i, sn in enumerate(snapshots):
        if (id_str is None or sn.id_str == id_str) and (name is None or sn.name == name) and (id_str or name) is not None:
            return i
    return -1


def find_id_or_name(snapshots: list[Snapshot], key: str) -> int:
    """By id first, then by name (QEMU's find_snapshot_by_id_or_name, used by apply)."""
    i = find(snapshots, id_str=key)
    return i if i >= 0 else find(snapshots, name=key)


def _new_id(snapshots: list[Snapshot]) -> str:
    """One more than the largest numeric id (strtoul: leading digits, else 0)."""
    def num(text: str) -> int:
        digits = ""
        for ch in text.strip():
            if not ch.isdigit():
                break
            digits += ch
        return int(digits) if digits else 0
    return str(max((num(sn.id_str) for sn in snapshots), default=0) + 1)


# ---- the three operations ----------------------------------------------------------------
def create(img: "Qcow2Image", name: str, *, id_str: str | None = None, date_sec: int = 0, date_nsec: int = 0,
           vm_clock_nsec: int = 0) -> Snapshot:
    """qcow2_snapshot_create: copy the active L1, count its tree once more, then publish the table entry."""
    _require_writable(img, "snapshot create")
    snapshots, _size = _read(img)
    if len(snapshots) >= spec.QCOW_MAX_SNAPSHOTS:
        raise SnapshotRefused(f"{img.path}: snapshot create {name!r}: at most {spec.QCOW_MAX_SNAPSHOTS} snapshots")
    ident = id_str or _new_id(snapshots)
    if find(snapshots, id_str=ident) >= 0:
        raise SnapshotRefused(f"{img.path}: snapshot create {name!r}: id {ident!r} exists already (EEXIST)")
    if len(ident.encode()) > 0xFFFF or len(name.encode()) > 0xFFFF:
        raise SnapshotRefused(f"{img.path}: snapshot create: id and name must be at most 65535 bytes")
    check_room(img, img.l1, "snapshot create")
    with _snapshot_sites(img):
        l1_size = len(img.l1)
        l1_off = img.alloc_clusters(img.geo.size_to_clusters(l1_size * 8)) if l1_size else 0
        if l1_size:
            img._pwrite(l1_off, _pack(img.l1), WriteSite.SNAPSHOT_L1)
        update_refcounts(img, img.l1, img.hdr.l1_table_offset, +1, active=True)
        sn = Snapshot(id_str=ident, name=name, l1_table_offset=l1_off, l1_size=l1_size, disk_size=img.hdr.size,
                      date_sec=date_sec, date_nsec=date_nsec, vm_clock_nsec=vm_clock_nsec)
        _write_table(img, snapshots + [sn])
    return sn


def apply(img: "Qcow2Image", key: str) -> Snapshot:
    """qcow2_snapshot_goto: count the snapshot's tree, overwrite the active L1 with its L1, drop the old tree."""
    _require_writable(img, "snapshot apply")
    snapshots, _size = _read(img)
    i = find_id_or_name(snapshots, key)
    if i < 0:
        raise SnapshotNotFound(f"{img.path}: snapshot apply {key!r}: no snapshot with this id or name (ENOENT)")
    sn = snapshots[i]
    validate_l1(img.path, sn, img.geo.cluster_size)
    if sn.disk_size != img.hdr.size:
        raise SnapshotRefused(f"{img.path}: snapshot apply {key!r}: qcow2: Loading snapshots with different disk "
                              f"size is not implemented (snapshot {sn.disk_size}, image {img.hdr.size})")
    if sn.l1_size > len(img.l1):
        raise UnsupportedFeature(img.path, sn.l1_table_offset, f"snapshot {sn.id_str} l1_size",
                                 ["growing the active L1 table to load a snapshot"])
    sn_l1 = _unpack(read_exact(img.file, sn.l1_table_offset, sn.l1_size * 8)) + [0] * (len(img.l1) - sn.l1_size)
    check_room(img, sn_l1, "snapshot apply")
    with _snapshot_sites(img):
        update_refcounts(img, list(sn_l1[: sn.l1_size]), sn.l1_table_offset, +1, active=False)
        # Deviation from QEMU 7.2, which writes the snapshot's L1 as it read it *before* the
        # increment, COPIED flags of the day the snapshot was taken included: until the final
        # COPIED pass is synced, a crash leaves COPIED on L2 tables the snapshot shares, and a
        # write after recovery changes the snapshot's L2 table in place. Every L2 table the
        # snapshot reaches is shared now, so none may carry COPIED.
        if not inject.on("snapshot-apply-stale-copied"):
            sn_l1 = [e & ~_COPIED for e in sn_l1]
        # bdrv_pwrite_sync of the whole active L1: one write, then a flush.
        img._pwrite(img.hdr.l1_table_offset, _pack(sn_l1), WriteSite.SNAPSHOT_L1)
        img._file_flush()
        old = list(img.l1)
        update_refcounts(img, old, img.hdr.l1_table_offset, -1, active=True, write_l1=False)
        img.l1 = sn_l1
        update_refcounts(img, img.l1, img.hdr.l1_table_offset, 0, active=True)
    return sn


def delete(img: "Qcow2Image", *, id_str: str | None = None, name: str | None = None) -> Snapshot:
    """qcow2_snapshot_delete: publish the table without the entry, then drop its references and free its L1."""
    _require_writable(img, "snapshot delete")
    snapshots, _size = _read(img)
    i = find(snapshots, id_str=id_str, name=name)
    if i < 0:
        raise SnapshotNotFound(f"{img.path}: snapshot delete id={id_str!r} name={name!r}: snapshot not found (ENOENT)")
    sn = snapshots[i]
    validate_l1(img.path, sn, img.geo.cluster_size)
    with _snapshot_sites(img):
        _write_table(img, snapshots[:i] + snapshots[i + 1:])
        sn_l1 = _unpack(read_exact(img.file, sn.l1_table_offset, sn.l1_size * 8))
        if not inject.on("snapshot-delete-no-decrement"):
            update_refcounts(img, sn_l1, sn.l1_table_offset, -1, active=False)
        _free_range(img, sn.l1_table_offset, sn.l1_size * 8)
        update_refcounts(img, img.l1, img.hdr.l1_table_offset, 0, active=True)
    return sn


# ---- reading a snapshot (qemu-img convert -l) ----------------------------------------------
def read(img: "Qcow2Image", key: str, offset: int, length: int) -> bytes:
    """Guest bytes of a snapshot, by id or name, through its L1 (QEMU's snapshot_load_tmp, read-only)."""
    with loaded(img, key):
        return img.read(offset, length)


@contextlib.contextmanager
def loaded(img: "Qcow2Image", key: str) -> Iterator[None]:
    """Reads of `img` inside go through the snapshot's L1 (by id or name), then the active L1 is back."""
    active = img.l1
    img.l1 = snapshot_l1(img, key)
    try:
        yield
    finally:
        img.l1 = active


def snapshot_l1(img: "Qcow2Image", key: str) -> list[int]:
    """A snapshot's L1 table (by id or name), padded with zeros to the active L1's size."""
    snapshots = list_snapshots(img)
    i = find_id_or_name(snapshots, key)
    if i < 0:
        raise SnapshotNotFound(f"{img.path}: snapshot {key!r}: no snapshot with this id or name")
    sn = snapshots[i]
    validate_l1(img.path, sn, img.geo.cluster_size)
    sn_l1 = _unpack(read_exact(img.file, sn.l1_table_offset, sn.l1_size * 8))
    return sn_l1 + [0] * max(0, len(img.l1) - len(sn_l1))


# ---- qcow2_update_snapshot_refcount ----------------------------------------------------------
def update_refcounts(img: "Qcow2Image", l1: list[int], l1_offset: int, addend: int, *, active: bool,
                     write_l1: bool = True) -> None:
    """Add `addend` (-1, 0, +1) to every cluster an L1 reaches and recompute COPIED; flush; rewrite the L1 if changed.

    `l1` is updated in place (the active L1 is the image's own list). With addend -1 the
    L1 is not written (QEMU: it is about to be freed or overwritten).
    """
    geo, version = img.geo, img.hdr.version
    l1_modified = False
    for i, l1e in enumerate(l1):
        l2_off = l1e & spec.L1E_OFFSET_MASK
        if not l2_off:
            continue
        if not geo.is_aligned(l2_off):
            raise CorruptImage(img.path, l1_offset + 8 * i, f"L1[{i}]", l1e, f"L2 table offset {l2_off:#x} unaligned")
        table = img.l2cache.get(l2_off)
        # A zero entry changes nothing (no cluster, no COPIED flag to set or clear): only the others are
        # visited (a 2 MiB table is 262,144 entries, a handful set). Decoded up front: the loop writes
        # back only the entry it is at.
        for j, old in nonzero_u64_items(table):
            entry = old & ~_COPIED
            ctype = l2_cluster_type(entry, version)
            refcount = 0
            if ctype is ClusterType.COMPRESSED:
                raise UnsupportedFeature(img.path, l2_off + 8 * j, f"L2 entry {j}", ["compressed clusters"])
            if ctype in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                host = entry & spec.L2E_OFFSET_MASK
                if not geo.is_aligned(host):
                    raise CorruptImage(img.path, l2_off + 8 * j, f"L2 entry {j}", old, f"cluster offset {host:#x} unaligned")
                _add(img, host, addend, data=True)
                refcount = img.refcount(geo.offset_to_cluster(host))
            keep_copied = addend > 0 and inject.on("snapshot-copied-left-set") and old & _COPIED
            if refcount == 1 or keep_copied:
                entry |= _COPIED
            if entry != old:
                if addend > 0:
                    img.l2cache.set_dependency(img.refcache)
                set_entry(table, j, entry)
                img.l2cache.mark_dirty(l2_off)
        _add(img, l2_off, addend, data=False)
        new = l2_off | (_COPIED if img.refcount(geo.offset_to_cluster(l2_off)) == 1 else 0)
        if new != l1e:
            l1[i] = new
            l1_modified = True
    if not (addend > 0 and inject.on("snapshot-table-before-refcounts")):
        img.flush()  # bdrv_flush(bs): L2 tables, refcount blocks unless dirty, then the file
    if write_l1 and addend >= 0 and l1_modified:
        img._pwrite(l1_offset, _pack(l1), WriteSite.SNAPSHOT_L1)
        img._file_flush()


def _add(img: "Qcow2Image", host: int, addend: int, *, data: bool) -> None:
    if addend > 0:
        img.refcounts._update_refcount(img.geo.offset_to_cluster(host), +1)
    elif addend < 0:
        _drop(img, host)
        if data and inject.on("snapshot-delete-double-decrement") and img.refcount(img.geo.offset_to_cluster(host)):
            _drop(img, host)


def _drop(img: "Qcow2Image", host: int) -> None:
    # As QEMU's update_refcount(decrease): the refcount block waits for the L2 tables, and a
    # table whose count reaches zero leaves the L2 cache (it must never be written back).
    img.refcache.set_dependency(img.l2cache)
    cluster = img.geo.offset_to_cluster(host)
    img.refcounts._update_refcount(cluster, -1)
    if img.refcount(cluster) == 0:
        img.l2cache.drop(host)


def _free_range(img: "Qcow2Image", offset: int, length: int) -> None:
    if not length:
        return
    first = img.geo.offset_to_cluster(offset)
    for c in range(first, first + img.geo.size_to_clusters(length)):
        img.free_cluster(img.geo.cluster_to_offset(c))


# ---- qcow2_write_snapshots -----------------------------------------------------------------
def _write_table(img: "Qcow2Image", snapshots: list[Snapshot]) -> None:
    """Place the whole new table in fresh clusters, flush, switch the header to it (synced), free the old one."""
    _old, old_size = _read(img)
    old_offset = img.hdr.snapshots_offset
    raw = table_bytes(snapshots)
    offset = 0
    if raw:
        offset = img.alloc_clusters(img.geo.size_to_clusters(len(raw)))
        if not inject.on("snapshot-table-before-refcounts"):
            img.flush()  # the new clusters are counted on disk before the table lands in them
        img._pwrite(offset, raw, WriteSite.SNAPSHOT_TABLE)
        img._file_flush()
    img.hdr.nb_snapshots, img.hdr.snapshots_offset = len(snapshots), offset
    start, field = img.hdr.field_bytes("nb_snapshots", "snapshots_offset")
    img._pwrite(start, field, WriteSite.SNAPSHOT_HEADER)
    img._file_flush()
    if old_size:
        _free_range(img, old_offset, old_size)


# ---- helpers -------------------------------------------------------------------------------
def check_room(img: "Qcow2Image", l1: list[int], what: str) -> None:
    """Refuse before writing anything if one more reference would overflow a refcount (QEMU fails half way)."""
    geo, version = img.geo, img.hdr.version
    extra: Counter[int] = Counter()
    for l1e in l1:
        l2_off = l1e & spec.L1E_OFFSET_MASK
        if not l2_off:
            continue
        extra[geo.offset_to_cluster(l2_off)] += 1
        entries = struct.unpack(f">{geo.l2_entries}Q", img.l2cache.get(l2_off))
        for entry in entries:
            if entry and l2_cluster_type(entry, version) in (ClusterType.NORMAL, ClusterType.ZERO_ALLOC):
                extra[geo.offset_to_cluster(entry & spec.L2E_OFFSET_MASK)] += 1
    for cluster, n in extra.items():
        if img.refcount(cluster) + n > geo.refcount_max:
            raise SnapshotRefused(f"{img.path}: {what}: cluster {cluster} would reach refcount "
                                  f"{img.refcount(cluster) + n}, above refcount_bits={geo.refcount_bits} allow "
                                  f"({geo.refcount_max}) (QEMU fails with EINVAL and leaks)")


@contextlib.contextmanager
def _snapshot_sites(img: "Qcow2Image") -> Iterator[None]:
    """Tag the cache write-backs a snapshot operation causes with the snapshot write sites."""
    l2_site, ref_site = img.l2cache.site, img.refcache.site
    img.l2cache.site, img.refcache.site = WriteSite.SNAPSHOT_L2, WriteSite.SNAPSHOT_REFBLOCK
    try:
        yield
    finally:
        img.l2cache.site, img.refcache.site = l2_site, ref_site


def _require_writable(img: "Qcow2Image", what: str) -> None:
    if img.readonly or img.closed:
        raise ImageNotWritable(f"{img.path}: {what}: image is read-only or closed")


def _pack(entries: list[int]) -> bytes:
    return struct.pack(f">{len(entries)}Q", *entries)


def _unpack(raw: bytes) -> list[int]:
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))
