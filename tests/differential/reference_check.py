"""The checker as it was before the split and the speed-up (main at ec1ebd8, models/qcow2/check.py), kept verbatim as the full-path oracle.

tests/differential/test_check_fast_vs_full.py runs it and the package on the same
seeded crash images and asserts they agree on everything: counts, printed lines, the
writes of a repair, and the repaired bytes. Do not "fix" or speed up this file: it is
the reference the fast path is held to. (Exempt from the 500-line rule as a frozen copy
of the qcow2 checker port.)
"""


from __future__ import annotations

import bisect
import dataclasses
import enum
import errno
import itertools
import os
import re
import struct
from typing import Iterable

from models.blockio import BlockFile, WriteSite, read_exact
from models.qcow2 import inject, spec
from models.qcow2.errors import InvalidImage, UnsupportedFeature
from models.qcow2.geometry import Geometry, get_refcount, set_refcount
from models.qcow2.structs import FIELD_OFFSET, Header

__all__ = [
    "Fix",
    "Kind",
    "Finding",
    "CheckResult",
    "check",
    "repair",
    "exit_code",
    "clear_dirty_bit",
    "mark_clean_if_repaired",
    "format_human",
    "format_json",
    "format_stderr",
]

# Design notes (read QEMU's block/qcow2-refcount.c for the original):
#
# * One `_Checker` models one opened BlockDriverState: the header, the active L1 and the
#   refcount table are read once when it is created (qcow2_do_open with BDRV_O_CHECK);
#   refcount blocks go through a small write-back cache (the refcount-block cache).
# * `_Checker.check_refcounts()` is qcow2_check_refcounts(); `check()` adds what
#   qcow2_co_check_locked() and qemu-img's img_check() do around it: the second, read-only
#   "Double checking the fixed image now..." run on the same opened image, with the fixed
#   counts of the first run carried over.
# * The in-memory refcount table (IMRT) is sparse (a dict), so a large sparse host file costs
#   nothing; every loop is bounded by the file length or QEMU's table-size limits.
# * A cluster whose refcount a repair drops to 0 is discarded by qemu-img check (hole
#   punched); the block-file seam has no discard, so it is overwritten with zeros instead.
# * Deliberate differences from QEMU, all for crash safety or bounded cost:
#   - a flush between writing the rebuilt refcount structures and switching the header to
#     them (QEMU writes the header right after them, unflushed);
#   - fixed refcount blocks are written and flushed before the OFLAG_COPIED repair, not
#     on close (only visible when the check later dies on a fatal corruption event);
#   - the rebuild never allocates a cluster that an on-disk reference points at, even when
#     that reference lies a full cluster or more past EOF (QEMU would place a refblock
#     there and so hand refcount data to the guest, or fail its overlap check);
#   - a "refcount block is outside image" repair grows the file by at most `max_growth`
#     bytes (QEMU tries any size and lets the host file system refuse);
#   - the caller, not close, clears the dirty bit, and only by QEMU's check rule (qemu-img
#     7.2 `check -r leaks` on a dirty image that needs a rebuild clears it on close anyway).

INT64_MAX = (1 << 63) - 1
INT_MAX = (1 << 31) - 1
MAX_REPAIR_GROWTH = 64 << 20  # default bound on one "refcount block is outside image" file growth
# Work bound for the L2 walks (entries looked at); a legitimate image never needs more than
# a few passes over every 8-byte word of its file.
_MIN_L2_BUDGET = 1 << 22

_L1E_OFFSET_MASK = spec.L1E_OFFSET_MASK
_L2E_OFFSET_MASK = spec.L2E_OFFSET_MASK
_COPIED = spec.QCOW_OFLAG_COPIED
_COMPRESSED = spec.QCOW_OFLAG_COMPRESSED
_ZERO = spec.QCOW_OFLAG_ZERO


class Fix(enum.IntFlag):
    """What a check may repair (QEMU's BdrvCheckMode: BDRV_FIX_LEAKS, BDRV_FIX_ERRORS)."""

    NONE = 0
    LEAKS = 1
    ERRORS = 2
    ALL = LEAKS | ERRORS


class Kind(enum.StrEnum):
    """What a printed check line is about."""

    REFCOUNT_ERROR = "refcount-error"  # ERROR cluster N refcount=R reference=r (R < r)
    LEAK = "leak"  # Leaked cluster N refcount=R reference=r
    REPAIRED = "repaired"  # Repairing cluster N refcount=R reference=r
    REFCOUNT_IO = "refcount-io"  # Can't get refcount for cluster N: ...
    COPIED_DATA = "copied-data"  # OFLAG_COPIED data cluster
    COPIED_L2 = "copied-l2"  # OFLAG_COPIED L2 cluster
    L1_RESERVED = "l1-reserved"
    L2_UNALIGNED = "l2-unaligned"
    L2_RESERVED = "l2-reserved"
    DATA_UNALIGNED = "data-unaligned"
    PREALLOC_UNALIGNED = "prealloc-unaligned"
    COMPRESSED_COPIED = "compressed-copied"
    PAST_EOF = "past-eof"
    EXTENDED = "extended"  # qcrash only: file grown over clusters referenced past its end
    OVERFLOW = "overflow"
    REFTABLE_RESERVED = "reftable-reserved"
    REFBLOCK_UNALIGNED = "refblock-unaligned"
    REFBLOCK_OUTSIDE = "refblock-outside"
    RESIZE_FAILED = "resize-failed"
    REFBLOCK_REFCOUNT = "refblock-refcount"
    REBUILD = "rebuild"  # Rebuilding refcount structure
    NEED_REBUILD = "need-rebuild"  # ERROR need to rebuild refcount structures
    REBUILD_BROKEN = "rebuild-broken"
    REBUILD_FAILED = "rebuild-failed"
    CORRUPTION_SIGNAL = "corruption-signal"  # qcow2: Marking image as corrupt / Image is corrupt
    WRITE_FAILED = "write-failed"


@dataclasses.dataclass(frozen=True, slots=True)
class Finding:
    """One line QEMU prints on stderr during the check, with the numbers it carries."""

    kind: Kind
    cluster: int | None = None  # host cluster index, where the line names one
    refcount: int | None = None  # the on-disk refcount it printed
    reference: int | None = None  # the computed number of references it printed
    message: str = ""  # the line exactly as QEMU prints it (without the newline)


@dataclasses.dataclass(slots=True)
class CheckCounts:
    """The counters qemu-img check reports (QEMU's BdrvCheckResult / ImageCheck numbers)."""

    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    corruptions_fixed: int = 0
    leaks_fixed: int = 0
    image_end_offset: int = 0
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0


@dataclasses.dataclass(slots=True)
class CheckResult(CheckCounts):
    """What qemu-img check reports (ImageCheck), plus the printed lines and how the repair went.

    After a repair that fixed anything, the counts are those of the read-only re-check
    ("Double checking the fixed image now..."), with corruptions_fixed/leaks_fixed carried
    over from the repairing run, exactly as qemu-img reports them.
    """

    findings: list[Finding] = dataclasses.field(default_factory=list)
    rebuilt: bool = False
    fix: Fix = Fix.NONE
    # strerror text when the check itself failed (qemu-img: "Check failed: <error>", exit 1,
    # no summary printed); None when it completed.
    error: str | None = None
    # True when the re-check after a repair ran ("Double checking the fixed image now...").
    double_checked: bool = False
    # QEMU's mark-clean rule evaluated on the repairing run: fix requested, the check completed,
    # 0 corruptions and 0 check errors left. Only then may the dirty and corrupt bits be cleared.
    consistent_after_fix: bool = False
    # After a double check: the repairing run's own result (what QEMU's open-time repair of a
    # dirty image sees: it fails with "Could not repair dirty image" when that run failed or
    # had check errors). None when no double check ran (then this result is that run).
    first_pass: "CheckResult | None" = None

    @property
    def messages(self) -> list[str]:
        """The stderr lines of the check, in QEMU's order (without qemu-img's own "Check failed")."""
        return [f.message for f in self.findings]

    @property
    def repaired_any(self) -> bool:
        return bool(self.corruptions_fixed or self.leaks_fixed)

    @property
    def is_clean(self) -> bool:
        """qemu-img would exit 0."""
        return exit_code(self) == 0


def exit_code(result: CheckResult) -> int:
    """qemu-img check's exit status: 0 clean (or clean after repair), 1 check failed, 2 corruptions, 3 leaks only."""
    if result.error is not None or result.check_errors:
        return 1
    if result.corruptions:
        return 2
    if result.leaks:
        return 3
    return 0


# --------------------------------------------------------------------------------------
# internals


class _CheckFailed(Exception):
    """The check stops with a negative errno (QEMU: `goto fail` with ret < 0)."""

    def __init__(self, err: int) -> None:
        super().__init__(os.strerror(err))
        self.errno = err


class _RefcountIOError(Exception):
    """qcow2_get_refcount() failed (-EIO for an unaligned refblock offset)."""


@dataclasses.dataclass(slots=True)
class _Res(CheckCounts):
    """BdrvCheckResult: the counters, as the checking code updates them."""

    def copy(self) -> "_Res":
        return dataclasses.replace(self)


class _Imrt:
    """The in-memory refcount table: sparse, saturating at the image's refcount_max like QEMU's packed array."""

    def __init__(self, size: int, per_block: int) -> None:
        self.size = size  # QEMU's *nb_clusters / *refcount_table_size
        self.per_block = per_block
        self.counts: dict[int, int] = {}
        self.blocks: dict[int, set[int]] = {}
        self.block_order: list[int] = []  # sorted indices of refblocks holding a non-zero entry

    def get(self, cluster: int) -> int:
        return self.counts.get(cluster, 0)

    def set(self, cluster: int, value: int) -> None:
        block = cluster // self.per_block
        if value:
            self.counts[cluster] = value
            members = self.blocks.get(block)
            if members is None:
                members = self.blocks[block] = set()
                bisect.insort(self.block_order, block)
            members.add(cluster)
        elif cluster in self.counts:
            del self.counts[cluster]
            self.blocks[block].discard(cluster)

    def grow(self, new_size: int) -> None:
        if new_size > self.size:
            self.size = new_size

    def next_used(self, cluster: int, end: int) -> int | None:
        """The first cluster in [cluster, end) with a non-zero count."""
        pos = bisect.bisect_left(self.block_order, cluster // self.per_block)
        while pos < len(self.block_order):
            block = self.block_order[pos]
            if block * self.per_block >= end:
                return None
            hits = [c for c in self.blocks[block] if cluster <= c < end]
            if hits:
                return min(hits)
            pos += 1
        return None

    def refblock_bytes(self, block: int, cluster_size: int, order: int) -> bytearray:
        out = bytearray(cluster_size)
        base = block * self.per_block
        for cluster in self.blocks.get(block, ()):
            set_refcount(out, cluster - base, order, self.counts[cluster])
        return out


def _hash_x(value: int) -> str:
    """C's "%#" PRIx64: 0 prints as "0", anything else with a 0x prefix."""
    return f"{value:#x}" if value else "0"


_NONZERO_BYTE = re.compile(rb"[^\x00]")


def _nonzero_refcounts(block: bytes | bytearray, order: int, limit: int) -> Iterable[tuple[int, int]]:
    """(index, refcount) of the non-zero entries among the first `limit` of a refcount block.

    Found by scanning for non-zero bytes in C (a refcount block of a 2 MiB cluster holds
    up to 16 million entries, nearly all zero in the images the harness makes).
    """
    if order >= 3:
        width = 1 << (order - 3)
        indices = sorted({m.start() // width for m in _NONZERO_BYTE.finditer(block, 0, limit * width)})
        return [(i, int.from_bytes(block[i * width : (i + 1) * width], "big")) for i in indices]
    bits = 1 << order
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    out = []
    nbytes = (limit + per_byte - 1) // per_byte
    for m in _NONZERO_BYTE.finditer(block, 0, nbytes):
        pos = m.start()
        byte = block[pos]
        for k in range(per_byte):
            index = pos * per_byte + k
            value = (byte >> (k * bits)) & mask
            if value and index < limit:
                out.append((index, value))
    return out


class _Checker:
    """One opened image (QEMU's BDRVQcow2State with BDRV_O_CHECK) and the check run on it."""

    def __init__(self, file: BlockFile, path: str, findings: list[Finding], max_growth: int | None = None) -> None:
        self.file = file
        self.max_growth = max_growth
        self.path = path
        self.findings = findings
        self.writable = False
        self.signaled_corruption = False
        self.drv_dead = False  # QEMU sets bs->drv = NULL after a fatal corruption event
        self.corrupt_bit = False
        self._load_header()

    # ---------------------------------------------------------------- open

    def _invalid(self, field: str, value: object, rule: str) -> InvalidImage:
        return InvalidImage(self.path, FIELD_OFFSET.get(field), field, value, rule)

    def _load_header(self) -> None:
        raw = read_exact(self.file, 0, spec.V3_HEADER_LENGTH)
        hdr = Header.unpack(raw)
        self.hdr = hdr
        if hdr.magic != spec.QCOW_MAGIC:
            raise self._invalid("magic", hdr.magic, "Image is not in qcow2 format (magic must be 0x514649fb)")
        if hdr.version not in (2, 3):
            raise self._invalid("version", hdr.version, "Unsupported qcow2 version (QEMU accepts 2 and 3)")
        if not spec.MIN_CLUSTER_BITS <= hdr.cluster_bits <= spec.MAX_CLUSTER_BITS:
            raise self._invalid(
                "cluster_bits", hdr.cluster_bits, f"Unsupported cluster size: 2^{hdr.cluster_bits} (QEMU accepts 9..21)"
            )
        cs = 1 << hdr.cluster_bits
        if hdr.version >= 3:
            if hdr.header_length < spec.V3_MIN_HEADER_LENGTH:
                raise self._invalid("header_length", hdr.header_length, "qcow2 header too short (at least 104 bytes)")
            if hdr.header_length > cs:
                raise self._invalid("header_length", hdr.header_length, "qcow2 header exceeds cluster size")
        if hdr.backing_file_offset > cs:
            raise self._invalid("backing_file_offset", hdr.backing_file_offset, "Invalid backing file offset (must be <= cluster size)")
        unknown = hdr.incompatible_features & ~int(spec.INCOMPAT_MASK)
        if unknown:
            bits = [f"bit {b}" for b in range(64) if unknown >> b & 1]
            raise UnsupportedFeature(self.path, 72, "incompatible_features", bits, "unknown incompatible feature bits")
        unsupported = hdr.incompatible_features & int(spec.INCOMPAT_MASK & ~spec.INCOMPAT_SUPPORTED)
        if unsupported:
            names = [f.name.lower().replace("_", " ") for f in spec.IncompatFeature if f & unsupported]
            raise UnsupportedFeature(self.path, 72, "incompatible_features", names, "not implemented by qcrash's check")
        if hdr.refcount_order > spec.MAX_REFCOUNT_ORDER:
            raise self._invalid(
                "refcount_order", hdr.refcount_order, "Reference count entry width too large; may not exceed 64 bits"
            )
        if hdr.crypt_method:
            raise UnsupportedFeature(self.path, 32, "crypt_method", ["encryption"], "not implemented by qcrash's check")
        if hdr.nb_snapshots:
            raise UnsupportedFeature(self.path, 60, "nb_snapshots", ["internal snapshots"], "not implemented by qcrash's check")
        self.corrupt_bit = bool(hdr.incompatible_features & spec.IncompatFeature.CORRUPT)
        self.geo = Geometry(hdr.cluster_bits, hdr.refcount_order)
        self.cs = cs
        self.cb = hdr.cluster_bits
        self.order = hdr.refcount_order
        self.rb_entries = self.geo.refblock_entries
        self.refcount_max = self.geo.refcount_max

        # Refcount table (qcow2_validate_table, then qcow2_refcount_init).
        rt_entries = hdr.refcount_table_clusters * cs // 8
        if rt_entries > spec.QCOW_MAX_REFTABLE_SIZE // 8:
            raise self._invalid(
                "refcount_table_clusters", hdr.refcount_table_clusters, "Reference count table too large (max 8 MiB)"
            )
        if INT64_MAX - rt_entries * 8 < hdr.refcount_table_offset or hdr.refcount_table_offset % cs:
            raise self._invalid(
                "refcount_table_offset",
                hdr.refcount_table_offset,
                "Reference count table offset invalid (must be cluster aligned and fit in int64)",
            )
        # Header extensions (qcow2_read_extensions): only their framing matters to the check.
        self._check_extensions()
        # Active L1 table.
        if hdr.l1_size > spec.QCOW_MAX_L1_SIZE // 8:
            raise self._invalid("l1_size", hdr.l1_size, "Active L1 table too large (max 32 MiB)")
        if INT64_MAX - hdr.l1_size * 8 < hdr.l1_table_offset or hdr.l1_table_offset % cs:
            raise self._invalid(
                "l1_table_offset", hdr.l1_table_offset, "Active L1 table offset invalid (must be cluster aligned and fit in int64)"
            )
        need = self.geo.size_to_l1(hdr.size)
        if need > INT_MAX:
            raise self._invalid("size", hdr.size, "Image is too big (L1 index exceeds INT_MAX)")
        if hdr.l1_size < need:
            raise self._invalid("l1_size", hdr.l1_size, f"L1 table is too small (virtual size needs {need} entries)")

        self.reftable_offset = hdr.refcount_table_offset
        self.reftable = list(struct.unpack(f">{rt_entries}Q", read_exact(self.file, self.reftable_offset, rt_entries * 8)))
        self.l1_offset = hdr.l1_table_offset
        self.l1_size = hdr.l1_size
        self.l1 = list(struct.unpack(f">{self.l1_size}Q", read_exact(self.file, self.l1_offset, self.l1_size * 8)))
        self.refblock_cache: dict[int, bytearray] = {}
        self.refblock_dirty: set[int] = set()
        self._ol_cache: dict[str, set[int]] | None = None

    def _check_extensions(self) -> None:
        hdr = self.hdr
        end = hdr.backing_file_offset if hdr.backing_file_offset else self.cs
        offset = hdr.header_length
        raw = read_exact(self.file, 0, self.cs)
        while offset < end:
            if offset + 8 > end:
                raise InvalidImage(self.path, offset, "header extension", offset, "Header extension too large")
            ext_type, ext_len = struct.unpack_from(">II", raw, offset)
            offset += 8
            if ext_len > end - offset:
                raise InvalidImage(self.path, offset - 8, "header extension length", ext_len, "Header extension too large")
            if ext_type == spec.EXT_END:
                return
            if ext_type == spec.EXT_BITMAPS and hdr.autoclear_features & spec.AutoclearFeature.BITMAPS:
                raise UnsupportedFeature(self.path, offset - 8, "header extension", ["bitmaps"], "not implemented by qcrash's check")
            offset += (ext_len + 7) & ~7

    # ---------------------------------------------------------------- reporting

    def emit(self, kind: Kind, message: str, cluster: int | None = None, refcount: int | None = None, reference: int | None = None) -> None:
        self.findings.append(Finding(kind, cluster, refcount, reference, message))

    def signal_corruption(self, fatal: bool, message: str) -> None:
        """qcow2_signal_corruption(): fatal only on a writable node; marks the image corrupt."""
        fatal = fatal and self.writable
        if self.signaled_corruption and (not fatal or self.corrupt_bit):
            return
        if fatal:
            self.emit(Kind.CORRUPTION_SIGNAL, f"qcow2: Marking image as corrupt: {message}; further corruption events will be suppressed")
            self._mark_corrupt()
            self.drv_dead = True
        else:
            self.emit(Kind.CORRUPTION_SIGNAL, f"qcow2: Image is corrupt: {message}; further non-fatal corruption events will be suppressed")
        self.signaled_corruption = True

    def _mark_corrupt(self) -> None:
        self.corrupt_bit = True
        if self.hdr.version < 3:
            return  # a v2 header has no feature bits to write
        incompat = int.from_bytes(read_exact(self.file, 72, 8), "big") | spec.IncompatFeature.CORRUPT
        self.file.pwrite(72, int(incompat).to_bytes(8, "big"), WriteSite.REPAIR)
        self.file.flush()

    # ---------------------------------------------------------------- metadata overlap check

    _OL_NAMES = {
        "header": "qcow2_header",
        "l1": "active L1 table",
        "l2": "active L2 table",
        "reftable": "refcount table",
        "refblock": "refcount block",
    }

    def _clusters_of(self, start: int, length: int) -> range:
        return range(start >> self.cb, ((start + length - 1) >> self.cb) + 1)

    def _metadata_clusters(self) -> dict[str, set[int]]:
        """Host clusters of the active L2 tables and of the refcount blocks (rebuilt after a reftable switch)."""
        if self._ol_cache is None:
            l2: set[int] = set()
            for entry in self.l1:
                if entry & _L1E_OFFSET_MASK:
                    l2.update(self._clusters_of(entry & _L1E_OFFSET_MASK, self.cs))
            refblocks: set[int] = set()
            for entry in self.reftable:
                if entry & spec.REFT_OFFSET_MASK:
                    refblocks.update(self._clusters_of(entry & spec.REFT_OFFSET_MASK, self.cs))
            self._ol_cache = {"l2": l2, "refblock": refblocks}
        return self._ol_cache

    def overlap(self, offset: int, size: int, ignore: frozenset[str] = frozenset()) -> str | None:
        """qcow2_check_metadata_overlap() with the "cached" template (no snapshots, no bitmaps)."""
        if not size:
            return None
        if "header" not in ignore and offset < self.cs:
            return "header"
        written = self._clusters_of(offset, size)

        def hits(start: int, length: int) -> bool:
            table = self._clusters_of(start, length)
            return written.start < table.stop and table.start < written.stop

        if "l1" not in ignore and self.l1_size and hits(self.l1_offset, self.l1_size * 8):
            return "l1"
        if "reftable" not in ignore and self.reftable and hits(self.reftable_offset, len(self.reftable) * 8):
            return "reftable"
        tables = self._metadata_clusters()
        for name in ("l2", "refblock"):
            if name not in ignore and any(c in tables[name] for c in written):
                return name
        return None

    def pre_write_overlap_check(self, offset: int, size: int, ignore: frozenset[str] = frozenset()) -> bool:
        """True when the write may go ahead; otherwise the image is marked corrupt (fatal event)."""
        hit = self.overlap(offset, size, ignore)
        if hit is None:
            return True
        self.signal_corruption(True, f"Preventing invalid write on metadata (overlaps with {self._OL_NAMES[hit]})")
        return False

    # ---------------------------------------------------------------- on-disk refcounts

    def refblock(self, offset: int) -> bytearray:
        block = self.refblock_cache.get(offset)
        if block is None:
            block = bytearray(read_exact(self.file, offset, self.cs))
            self.refblock_cache[offset] = block
        return block

    def get_refcount(self, cluster: int) -> int:
        """qcow2_get_refcount(): the on-disk refcount, through the refblock cache."""
        index = cluster // self.rb_entries
        if index >= len(self.reftable):
            return 0
        offset = self.reftable[index] & spec.REFT_OFFSET_MASK
        if not offset:
            return 0
        if offset & (self.cs - 1):
            self.signal_corruption(True, f"Refblock offset {_hash_x(offset)} unaligned (reftable index: {_hash_x(index)})")
            raise _RefcountIOError()
        return get_refcount(self.refblock(offset), cluster % self.rb_entries, self.order)

    def set_refcount_ondisk(self, cluster: int, value: int) -> None:
        """update_refcount() for one cluster whose refblock exists (the only case a fix needs)."""
        index = cluster // self.rb_entries
        offset = self.reftable[index] & spec.REFT_OFFSET_MASK
        block = self.refblock(offset)
        set_refcount(block, cluster % self.rb_entries, self.order, value)
        self.refblock_dirty.add(offset)
        if value == 0:
            # A freed cluster that is itself a cached refblock is dropped from the cache unwritten.
            freed = cluster << self.cb
            if freed in self.refblock_cache and freed != offset:
                del self.refblock_cache[freed]
                self.refblock_dirty.discard(freed)
            self.discard_cluster(freed)

    def discard_cluster(self, offset: int) -> None:
        """QCOW2_DISCARD_ALWAYS: qemu-img check punches a hole in a cluster whose refcount drops to 0.

        The block-file seam has no discard, so the hole is written as zeros (what a reader then
        sees). The cluster is referenced by nothing, so this is safe at any crash point.
        """
        end = min(offset + self.cs, self.file.size())
        if end > offset:
            self.file.pwrite(offset, bytes(end - offset), WriteSite.REPAIR)

    def flush_refblocks(self) -> None:
        """Write back the dirty refcount blocks (qcow2_cache_flush), then flush the file."""
        if not self.refblock_dirty:
            return
        for offset in sorted(self.refblock_dirty):
            if not self.pre_write_overlap_check(offset, self.cs, frozenset({"refblock"})):
                self.emit(Kind.WRITE_FAILED, "ERROR: Could not write refcount block; metadata overlap check failed: Input/output error")
                self.res.check_errors += 1
                raise _CheckFailed(errno.EIO)
            self.file.pwrite(offset, bytes(self.refblock_cache[offset]), WriteSite.REPAIR)
        self.refblock_dirty.clear()
        self._repair_flush()

    def _repair_flush(self) -> None:
        # Injected bug: "flush once at the end" leaves the switched header, the new
        # structures and the cleared dirty bit in one epoch, in any order after a crash.
        if not inject.on("rebuild-switch-before-durable"):
            self.file.flush()

    # ---------------------------------------------------------------- the IMRT

    def inc_refcounts(self, imrt: _Imrt, offset: int, size: int) -> None:
        """qcow2_inc_refcounts_imrt()."""
        if size <= 0:
            return
        file_len = self.file.size()
        if offset + size - file_len >= self.cs:
            self.emit(
                Kind.PAST_EOF,
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                f"offset {offset:#x} size {size:#x}",
            )
            self.res.corruptions += 1
            first = offset >> self.cb
            last = (offset + size - 1) >> self.cb
            if last - first < (1 << 20):
                self.past_eof_clusters.update(range(first, last + 1))
            return
        cs_mask = ~(self.cs - 1)
        start = (offset & cs_mask) >> self.cb
        last = ((offset + size - 1) & cs_mask) >> self.cb
        for k in range(start, last + 1):
            if k >= imrt.size:
                imrt.grow(k + 1)
            refcount = imrt.get(k)
            if refcount == self.refcount_max:
                self.emit(Kind.OVERFLOW, f"ERROR: overflow cluster offset={k << self.cb:#x}", cluster=k)
                self.emit(
                    Kind.OVERFLOW,
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean "
                    "copy if the image cannot be opened for writing",
                    cluster=k,
                )
                self.res.corruptions += 1
                continue
            imrt.set(k, refcount + 1)

    def _spend(self, entries: int) -> None:
        self.l2_budget -= entries
        if self.l2_budget < 0:
            raise InvalidImage(
                self.path,
                self.l1_offset,
                "l1_table",
                self.l1_size,
                "the L1 entries point at the same L2 tables so often that checking them would take unbounded time",
            )

    @staticmethod
    def qemu_cluster_type(entry: int) -> str:
        """qcow2_get_cluster_type() as QEMU 7.2 computes it: the zero flag is honoured even in v2 images."""
        if entry & _COMPRESSED:
            return "compressed"
        if entry & _ZERO:
            return "zero-alloc" if entry & _L2E_OFFSET_MASK else "zero-plain"
        return "normal" if entry & _L2E_OFFSET_MASK else "unallocated"

    def check_refcounts_l2(self, imrt: _Imrt, l2_offset: int, frag: bool, fix: Fix) -> None:
        cs = self.cs
        raw = read_exact(self.file, l2_offset, cs)
        if raw.count(0) == cs:
            return
        entries = struct.unpack(f">{cs // 8}Q", raw)
        self._spend(len(entries))
        next_contiguous = 0
        for i, entry in enumerate(entries):
            if not entry:
                continue
            ctype = self.qemu_cluster_type(entry)
            if ctype != "compressed" and entry & spec.L2E_STD_RESERVED_MASK:
                self.emit(Kind.L2_RESERVED, f"ERROR found l2 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            if ctype == "compressed":
                if entry & _COPIED:
                    csize_shift = 62 - (self.cb - 8)
                    self.emit(
                        Kind.COMPRESSED_COPIED,
                        f"ERROR: coffset={entry & ((1 << csize_shift) - 1):#x}: copied flag must never be set for compressed clusters",
                    )
                    entry &= ~_COPIED
                    self.res.corruptions += 1
                csize_shift = 62 - (self.cb - 8)
                coffset = entry & ((1 << csize_shift) - 1)
                nb_csectors = ((entry >> csize_shift) & ((1 << (self.cb - 8)) - 1)) + 1
                csize = nb_csectors * 512 - (coffset & 511)
                self.inc_refcounts(imrt, coffset, csize)
                if frag:
                    self.res.allocated_clusters += 1
                    self.res.compressed_clusters += 1
                    self.res.fragmented_clusters += 1
            elif ctype in ("normal", "zero-alloc"):
                offset = entry & _L2E_OFFSET_MASK
                if offset & (cs - 1):
                    self.res.corruptions += 1
                    contains_data = not entry & _ZERO
                    if not contains_data:
                        verb = "Repairing" if fix & Fix.ERRORS else "ERROR"
                        self.emit(
                            Kind.PREALLOC_UNALIGNED,
                            f"{verb} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                        )
                        if fix & Fix.ERRORS:
                            if self.fix_l2_entry_by_zero(l2_offset, i):
                                continue  # the entry no longer references a cluster
                    else:
                        self.emit(
                            Kind.DATA_UNALIGNED,
                            f"ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted.",
                        )
                if frag:
                    self.res.allocated_clusters += 1
                    if next_contiguous and offset != next_contiguous:
                        self.res.fragmented_clusters += 1
                    next_contiguous = offset + cs
                self.inc_refcounts(imrt, offset, cs)

    def fix_l2_entry_by_zero(self, l2_offset: int, index: int) -> bool:
        """Turn an unaligned preallocated entry into ZERO_PLAIN (fix_l2_entry_by_zero)."""
        where = l2_offset + index * 8
        if not self.pre_write_overlap_check(where, 8, frozenset({"l2"})):
            self.emit(Kind.WRITE_FAILED, "ERROR: Overlap check failed")
            self.res.check_errors += 1
            raise _CheckFailed(errno.EIO)  # QEMU aborts checking this L2 table and the check
        self.file.pwrite(where, _ZERO.to_bytes(8, "big"), WriteSite.REPAIR)
        self.file.flush()
        self.res.corruptions -= 1
        self.res.corruptions_fixed += 1
        return True

    def check_refcounts_l1(self, imrt: _Imrt, frag: bool, fix: Fix) -> None:
        if not self.l1_size:
            return
        self.inc_refcounts(imrt, self.l1_offset, self.l1_size * 8)
        raw = read_exact(self.file, self.l1_offset, self.l1_size * 8)
        entries = struct.unpack(f">{self.l1_size}Q", raw)
        for entry in entries:
            if not entry:
                continue
            if entry & spec.L1E_RESERVED_MASK:
                self.emit(Kind.L1_RESERVED, f"ERROR found L1 entry with reserved bits set: {entry:x}")
                self.res.corruptions += 1
            l2_offset = entry & _L1E_OFFSET_MASK
            self.inc_refcounts(imrt, l2_offset, self.cs)
            if l2_offset & (self.cs - 1):
                self.emit(Kind.L2_UNALIGNED, f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
                self.res.corruptions += 1
            self.check_refcounts_l2(imrt, l2_offset, frag, fix)

    def check_refblocks(self, imrt: _Imrt, fix: Fix) -> bool:
        rebuild = False
        cs = self.cs
        for i in itertools.compress(range(len(self.reftable)), self.reftable):
            raw_entry = self.reftable[i]
            offset = raw_entry & spec.REFT_OFFSET_MASK
            cluster = offset >> self.cb
            if raw_entry & spec.REFT_RESERVED_MASK:
                self.emit(Kind.REFTABLE_RESERVED, f"ERROR refcount table entry {i} has reserved bits set")
                self.res.corruptions += 1
                rebuild = True
                continue
            if offset & (cs - 1):
                self.emit(Kind.REFBLOCK_UNALIGNED, f"ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted")
                self.res.corruptions += 1
                rebuild = True
                continue
            if cluster >= imrt.size:
                self.res.corruptions += 1
                verb = "Repairing" if fix & Fix.ERRORS else "ERROR"
                self.emit(Kind.REFBLOCK_OUTSIDE, f"{verb} refcount block {i} is outside image")
                if fix & Fix.ERRORS:
                    err = self._grow_file(offset + cs)
                    if err is None:
                        new_size = -(-self.file.size() // cs)
                        imrt.grow(new_size)
                        if cluster < imrt.size:
                            self.res.corruptions -= 1
                            self.res.corruptions_fixed += 1
                            self.inc_refcounts(imrt, offset, cs)
                            continue
                        err = errno.EINVAL
                    rebuild = True
                    self.emit(Kind.RESIZE_FAILED, f"ERROR could not resize image: {os.strerror(err)}")
                continue
            self.inc_refcounts(imrt, offset, cs)
            if imrt.get(cluster) != 1:
                self.emit(Kind.REFBLOCK_REFCOUNT, f"ERROR refcount block {i} refcount={imrt.get(cluster)}", cluster=cluster, reference=imrt.get(cluster))
                self.res.corruptions += 1
                rebuild = True
        return rebuild

    def _grow_file(self, new_size: int) -> int | None:
        """bdrv_truncate() to include a refblock past EOF; returns an errno on failure."""
        if new_size - self.cs > INT64_MAX - self.cs:
            return errno.EINVAL
        err = None
        if self.max_growth is not None and new_size - self.file.size() > self.max_growth:
            err = errno.EFBIG  # as if the host file system refused (QEMU would try; ext4 refuses past 16 TiB)
        else:
            try:
                self.file.truncate(new_size)
            except OSError as exc:
                err = exc.errno or errno.EIO
            except MemoryError:
                err = errno.ENOMEM
        if err is not None:
            self.emit(Kind.RESIZE_FAILED, f"qemu-img: Could not resize file: {os.strerror(err)}")
        return err

    def calculate_refcounts(self, fix: Fix, nb_clusters: int) -> tuple[_Imrt, bool]:
        imrt = _Imrt(nb_clusters, self.rb_entries)
        self.inc_refcounts(imrt, 0, self.cs)  # header
        self.check_refcounts_l1(imrt, True, fix)  # active L1, L2 tables, data
        # (no snapshots: their L1 tables and the snapshot table count nothing)
        if not inject.on("repair-forgets-table"):
            self.inc_refcounts(imrt, self.reftable_offset, len(self.reftable) * 8)
        rebuild = self.check_refblocks(imrt, fix)
        return imrt, rebuild

    def compare_refcounts(self, imrt: _Imrt, fix: Fix) -> tuple[bool, int]:
        """compare_refcounts(): returns (rebuild needed, highest cluster in use)."""
        rebuild = False
        highest = 0
        limit = imrt.size
        candidates: set[int] = {c for c in imrt.counts if c < limit}
        for index in range(min(len(self.reftable), -(-limit // self.rb_entries))):
            offset = self.reftable[index] & spec.REFT_OFFSET_MASK
            if not offset:
                continue
            base = index * self.rb_entries
            count = min(self.rb_entries, limit - base)
            if offset & (self.cs - 1):
                candidates.update(range(base, base + count))  # every lookup fails with EIO
                continue
            candidates.update(base + i for i, _ in _nonzero_refcounts(self.refblock(offset), self.order, count))
        for cluster in sorted(candidates):
            try:
                refcount1 = self.get_refcount(cluster)
            except _RefcountIOError:
                self.emit(Kind.REFCOUNT_IO, f"Can't get refcount for cluster {cluster}: Input/output error", cluster=cluster)
                self.res.check_errors += 1
                continue
            refcount2 = imrt.get(cluster)
            if refcount1 > 0 or refcount2 > 0:
                highest = cluster
            if refcount1 == refcount2:
                continue
            fixed = None
            if refcount1 == 0:
                rebuild = True
            elif refcount1 > refcount2 and fix & Fix.LEAKS:
                fixed = "leaks_fixed"
            elif refcount1 < refcount2 and fix & Fix.ERRORS:
                fixed = "corruptions_fixed"
            if fixed is not None:
                verb, kind = "Repairing", Kind.REPAIRED
            elif refcount1 < refcount2:
                verb, kind = "ERROR", Kind.REFCOUNT_ERROR
            else:
                verb, kind = "Leaked", Kind.LEAK
            self.emit(kind, f"{verb} cluster {cluster} refcount={refcount1} reference={refcount2}", cluster, refcount1, refcount2)
            if fixed is not None:
                self.set_refcount_ondisk(cluster, refcount2)
                setattr(self.res, fixed, getattr(self.res, fixed) + 1)
                continue
            if refcount1 < refcount2:
                self.res.corruptions += 1
            else:
                self.res.leaks += 1
        return rebuild, highest

    # ---------------------------------------------------------------- rebuild

    def alloc_clusters_imrt(self, imrt: _Imrt, count: int, first_free: int) -> tuple[int, int]:
        """alloc_clusters_imrt(): returns (offset, updated first_free)."""
        cluster = first_free
        contiguous = 0
        first_gap = True
        while cluster < imrt.size and contiguous < count:
            if not imrt.get(cluster) and cluster not in self.past_eof_clusters:
                contiguous += 1
                if first_gap:
                    first_free = cluster
                    first_gap = False
            elif contiguous:
                contiguous = 0
            cluster += 1
        if contiguous < count:
            # Clusters past the IMRT's end are free, except where a reference past EOF points.
            while contiguous < count:
                if cluster in self.past_eof_clusters:
                    contiguous = 0
                else:
                    contiguous += 1
                cluster += 1
            imrt.grow(cluster)
        cluster -= contiguous
        for i in range(count):
            imrt.set(cluster + i, 1)
        return cluster << self.cb, first_free

    def rebuild_write_refblocks(self, imrt: _Imrt, first: int, end: int, reftable: list[int]) -> bool:
        """rebuild_refcounts_write_refblocks(): returns whether the new reftable grew."""
        cs = self.cs
        first_free = 0
        grown = False
        cluster = first
        while True:
            found = imrt.next_used(cluster, end)
            if found is None:
                break
            cluster = found
            index = cluster // self.rb_entries
            start = index * self.rb_entries
            if index < len(reftable) and reftable[index]:
                offset = reftable[index]
            else:
                first_free = max(first_free, start)
                offset, first_free = self.alloc_clusters_imrt(imrt, 1, first_free)
                if (offset >> self.cb) >= end:
                    end = (offset >> self.cb) + 1
                if len(reftable) <= index:
                    entries = -(-((index + 1) * 8) // cs) * cs // 8
                    reftable.extend([0] * (entries - len(reftable)))
                    grown = True
                reftable[index] = offset
            if not self.pre_write_overlap_check(offset, cs):
                self.emit(Kind.REBUILD_FAILED, "qemu-img: ERROR writing refblock: Input/output error")
                self.res.check_errors += 1
                raise _CheckFailed(errno.EIO)
            self.file.pwrite(offset, bytes(imrt.refblock_bytes(index, cs, self.order)), WriteSite.REPAIR)
            cluster = start + self.rb_entries
        return grown

    def rebuild_refcount_structure(self, imrt: _Imrt) -> None:
        """rebuild_refcount_structure(), crash-safe: the header is switched only to durable structures."""
        self.flush_refblocks()
        self.refblock_cache.clear()
        reftable: list[int] = []
        grown = self.rebuild_write_refblocks(imrt, 0, imrt.size, reftable)
        assert grown
        while True:
            length = len(reftable) * 8
            clusters = -(-length // self.cs)
            rt_offset, _ = self.alloc_clusters_imrt(imrt, clusters, 0)
            start = rt_offset >> self.cb
            if not self.rebuild_write_refblocks(imrt, start, start + clusters, reftable):
                break
        if not self.pre_write_overlap_check(rt_offset, length):
            self.emit(Kind.REBUILD_FAILED, "qemu-img: ERROR writing reftable: Input/output error")
            self.res.check_errors += 1
            raise _CheckFailed(errno.EIO)
        self.file.pwrite(rt_offset, struct.pack(f">{len(reftable)}Q", *reftable), WriteSite.REPAIR)
        # Everything the new header will point at must be durable before the header does.
        self._repair_flush()
        start = FIELD_OFFSET["refcount_table_offset"]
        assert FIELD_OFFSET["refcount_table_clusters"] == start + 8
        self.file.pwrite(start, struct.pack(">QI", rt_offset, clusters), WriteSite.REFTABLE_SWITCH)
        self._repair_flush()
        self.reftable = reftable
        self.reftable_offset = rt_offset
        self._ol_cache = None

    # ---------------------------------------------------------------- OFLAG_COPIED

    def write_l1_entry(self, index: int) -> None:
        where = self.l1_offset + index * 8
        if not self.pre_write_overlap_check(where, 8, frozenset({"l1"})):
            self.res.check_errors += 1
            raise _CheckFailed(errno.EIO)
        self.file.pwrite(where, self.l1[index].to_bytes(8, "big"), WriteSite.REPAIR)
        self.file.flush()

    def check_oflag_copied(self, fix: Fix) -> None:
        res = self.res
        if fix & Fix.ERRORS:
            repair = True
        elif fix & Fix.LEAKS:
            repair = not res.check_errors and not res.corruptions and not res.leaks
        else:
            repair = False
        verb = "Repairing" if repair else "ERROR"
        wrote = False
        cs = self.cs
        for i in range(self.l1_size):
            l1_entry = self.l1[i]
            l2_offset = l1_entry & _L1E_OFFSET_MASK
            if not l2_offset:
                continue
            try:
                refcount = self.get_refcount(l2_offset >> self.cb)
            except _RefcountIOError:
                continue  # QEMU skips the whole L1 entry, silently
            if (refcount == 1) != bool(l1_entry & _COPIED):
                res.corruptions += 1
                self.emit(
                    Kind.COPIED_L2,
                    f"{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} refcount={refcount}",
                    cluster=l2_offset >> self.cb,
                    refcount=refcount,
                )
                if repair:
                    self.l1[i] = l1_entry | _COPIED if refcount == 1 else l1_entry & ~_COPIED
                    self.write_l1_entry(i)
                    res.corruptions -= 1
                    res.corruptions_fixed += 1
            table = bytearray(read_exact(self.file, l2_offset, cs))
            if table.count(0) == cs:
                continue
            entries = struct.unpack(f">{cs // 8}Q", table)
            self._spend(len(entries))
            dirty = 0
            for j, l2_entry in enumerate(entries):
                if not l2_entry or self.qemu_cluster_type(l2_entry) not in ("normal", "zero-alloc"):
                    continue
                data_offset = l2_entry & _L2E_OFFSET_MASK
                try:
                    refcount = self.get_refcount(data_offset >> self.cb)
                except _RefcountIOError:
                    continue
                if (refcount == 1) != bool(l2_entry & _COPIED):
                    res.corruptions += 1
                    self.emit(
                        Kind.COPIED_DATA,
                        f"{verb} OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}",
                        cluster=data_offset >> self.cb,
                        refcount=refcount,
                    )
                    if repair:
                        fixed = l2_entry | _COPIED if refcount == 1 else l2_entry & ~_COPIED
                        table[j * 8 : j * 8 + 8] = fixed.to_bytes(8, "big")
                        dirty += 1
            if dirty:
                if not self.pre_write_overlap_check(l2_offset, cs, frozenset({"l2"})):
                    self.emit(
                        Kind.WRITE_FAILED,
                        "ERROR: Could not write L2 table; metadata overlap check failed: Input/output error",
                    )
                    res.check_errors += 1
                    raise _CheckFailed(errno.EIO)
                self.file.pwrite(l2_offset, bytes(table), WriteSite.REPAIR)
                wrote = True
                res.corruptions -= dirty
                res.corruptions_fixed += dirty
        if wrote:
            self.file.flush()

    # ---------------------------------------------------------------- the whole check

    def check_refcounts(self, fix: Fix) -> None:
        """qcow2_check_refcounts(); raises _CheckFailed where QEMU returns a negative errno."""
        res = self.res
        size = self.file.size()
        nb_clusters = -(-size // self.cs)
        if nb_clusters > INT_MAX:
            res.check_errors += 1
            raise _CheckFailed(errno.EFBIG)
        res.total_clusters = self.geo.size_to_clusters(self.hdr.size // 512 * 512)

        imrt, rebuild = self.calculate_refcounts(fix, nb_clusters)
        pre_compare = res.copy()
        rebuild_cmp, highest = self.compare_refcounts(imrt, Fix.NONE)
        rebuild = rebuild or rebuild_cmp

        if rebuild and fix & Fix.ERRORS:
            old = res.copy()
            self.emit(Kind.REBUILD, "Rebuilding refcount structure")
            self.rebuild_refcount_structure(imrt)
            self.rebuilt = True
            res.corruptions = 0
            res.leaks = 0
            imrt, _ = self.calculate_refcounts(Fix.NONE, imrt.size)
            fresh_leaks = 0
            if fix & Fix.LEAKS:
                saved = res.copy()
                self.res = res = _Res()
                still_broken, highest = self.compare_refcounts(imrt, Fix.LEAKS)
                if still_broken:
                    self.emit(Kind.REBUILD_BROKEN, "ERROR rebuilt refcount structure is still broken")
                fresh_leaks = res.leaks
                self.res = res = saved
            if res.corruptions < old.corruptions:
                res.corruptions_fixed += old.corruptions - res.corruptions
            if res.leaks < old.leaks:
                res.leaks_fixed += old.leaks - res.leaks
            res.leaks += fresh_leaks
        elif fix:
            if rebuild:
                self.emit(Kind.NEED_REBUILD, "ERROR need to rebuild refcount structures")
                res.check_errors += 1
                raise _CheckFailed(errno.EIO)
            if res.leaks or res.corruptions:
                self.res = res = pre_compare
                _, highest = self.compare_refcounts(imrt, fix)
        self.flush_refblocks()

        self.check_oflag_copied(fix)
        res = self.res
        res.image_end_offset = (highest + 1) * self.cs

    def run(self, fix: Fix) -> tuple[_Res, str | None]:
        """qcow2_co_check_locked() without the snapshot-table part: (result, strerror or None)."""
        self.writable = bool(fix)
        self.res = _Res()
        self.rebuilt = False
        self.past_eof_clusters: set[int] = set()
        self.l2_budget = max(_MIN_L2_BUDGET, 4 * (self.file.size() // 8))
        try:
            self.check_refcounts(fix)
        except _CheckFailed as exc:
            return self.res, os.strerror(exc.errno)
        return self.res, None


def _to_result(res: _Res, findings: list[Finding], fix: Fix) -> CheckResult:
    return CheckResult(
        corruptions=res.corruptions,
        leaks=res.leaks,
        check_errors=res.check_errors,
        corruptions_fixed=res.corruptions_fixed,
        leaks_fixed=res.leaks_fixed,
        image_end_offset=res.image_end_offset,
        total_clusters=res.total_clusters,
        allocated_clusters=res.allocated_clusters,
        fragmented_clusters=res.fragmented_clusters,
        compressed_clusters=res.compressed_clusters,
        findings=findings,
        fix=fix,
    )


def check(
    file: BlockFile, fix: Fix = Fix.NONE, *, path: str | None = None, max_growth: int | None = MAX_REPAIR_GROWTH
) -> CheckResult:
    """Check (and with `fix`, repair) the qcow2 image in `file` exactly as `qemu-img check [-r ...]` does.

    Reads the header from the file itself. Never touches the dirty bit: see `repair()` and
    `mark_clean_if_repaired()`. Raises InvalidImage / UnsupportedFeature where QEMU would
    refuse to open the image at all ("Could not open ...", exit 1).

    `max_growth` bounds how far a "refcount block is outside image" repair may extend the
    file in one step (QEMU tries any size and lets the host file system refuse); None
    removes the bound, which is only sensible for sparse host files.
    """
    fix = Fix(fix)
    name = path if path is not None else file.name
    findings: list[Finding] = []
    if fix & Fix.ERRORS:
        _extend_to_references(file, findings, max_growth)
    checker = _Checker(file, name, findings, max_growth)
    res, error = checker.run(fix)
    result = _to_result(res, findings, fix)
    result.error = error
    result.rebuilt = checker.rebuilt
    result.consistent_after_fix = bool(fix) and error is None and res.check_errors == 0 and res.corruptions == 0
    if error is None and (res.corruptions_fixed or res.leaks_fixed):
        first = dataclasses.replace(result, findings=list(findings))
        # qemu-img: "Double checking the fixed image now..." on the same (still open) image.
        result.double_checked = True
        if checker.drv_dead:
            second, second_error = _Res(), os.strerror(errno.ENOMEDIUM)
        else:
            # The same open image, as in qemu-img (no re-validation of the header).
            second, second_error = checker.run(Fix.NONE)
        final = _to_result(second, findings, fix)
        final.corruptions_fixed = res.corruptions_fixed
        final.leaks_fixed = res.leaks_fixed
        final.error = second_error
        final.rebuilt = result.rebuilt
        final.double_checked = True
        final.consistent_after_fix = result.consistent_after_fix
        final.first_pass = first
        result = final
    return result


def _extend_to_references(file: BlockFile, findings: list[Finding], max_growth: int | None) -> None:
    """qcrash's repair (QEMU has no such step): grow the file over data and L2 clusters referenced past its end.

    With lazy refcounts an allocating write is `data, L2, flush`: a crash can keep the L2
    update and lose the growth of the file that the data write caused. The cluster then
    lies past EOF, which reads as zeros, the value it held before the lost write. Growing
    the file with zeros keeps that guest view and turns the reference into one that the
    rebuild can count; without it QEMU's check reports a corruption it cannot fix.
    """
    try:
        raw = file.pread(0, 104)
        if len(raw) < 72:
            return
        hdr = Header.unpack(raw + bytes(104 - len(raw)))
        if hdr.magic != spec.QCOW_MAGIC or not spec.MIN_CLUSTER_BITS <= hdr.cluster_bits <= spec.MAX_CLUSTER_BITS:
            return
        cs = 1 << hdr.cluster_bits
        if hdr.l1_size * 8 > spec.QCOW_MAX_L1_SIZE or hdr.l1_table_offset % cs:
            return
        size = file.size()
        end = 0
        l1 = file.pread(hdr.l1_table_offset, hdr.l1_size * 8)
        for i in range(len(l1) // 8):
            l2_off = int.from_bytes(l1[i * 8 : i * 8 + 8], "big") & spec.L1E_OFFSET_MASK
            if not l2_off or l2_off % cs:
                continue
            end = max(end, l2_off + cs)
            if l2_off >= size:
                continue
            table = file.pread(l2_off, cs)
            for j in range(len(table) // 8):
                entry = int.from_bytes(table[j * 8 : j * 8 + 8], "big")
                if entry & spec.QCOW_OFLAG_COMPRESSED:
                    continue
                host = entry & spec.L2E_OFFSET_MASK
                if host and not host % cs:
                    end = max(end, host + cs)
    except (OSError, ValueError, struct.error):
        return
    if end - size < cs or (max_growth is not None and end - size > max_growth):
        return
    file.truncate(end)
    file.flush()
    findings.append(Finding(Kind.EXTENDED, message=f"Repairing: extended the image to {end:#x} to include clusters referenced past its "
                            f"end (they read as zeros)"))


# --------------------------------------------------------------------------------------
# the dirty and corrupt bits


def clear_dirty_bit(file: BlockFile) -> bool:
    """Clear the dirty and corrupt bits (qcow2_mark_clean + qcow2_mark_consistent): header bytes 72..79, pwrite then flush.

    Returns whether anything was written (v2 images have no feature bits).
    """
    hdr = Header.unpack(read_exact(file, 0, spec.V3_HEADER_LENGTH))
    if hdr.version < 3:
        return False
    bits = int(spec.IncompatFeature.DIRTY | spec.IncompatFeature.CORRUPT)
    if not hdr.incompatible_features & bits:
        return False
    start = FIELD_OFFSET["incompatible_features"]
    file.pwrite(start, (hdr.incompatible_features & ~bits).to_bytes(8, "big"), WriteSite.DIRTY_BIT)
    file.flush()
    return True


def mark_clean_if_repaired(file: BlockFile, result: CheckResult) -> bool:
    """QEMU's rule: after a check with fix requested that left 0 corruptions and 0 check errors, clear the dirty and corrupt bits.

    The caller (the image's open path, the CLI) calls this after `check(..., fix)`;
    `check()` itself never touches the bits. Returns whether the header was written.
    """
    if not result.consistent_after_fix:
        return False
    return clear_dirty_bit(file)


def repair(
    file: BlockFile, fix: Fix = Fix.ALL, *, path: str | None = None, max_growth: int | None = MAX_REPAIR_GROWTH
) -> CheckResult:
    """check(file, fix), then clear the dirty/corrupt bits when QEMU would (see mark_clean_if_repaired)."""
    result = check(file, fix, path=path, max_growth=max_growth)
    mark_clean_if_repaired(file, result)
    return result


# --------------------------------------------------------------------------------------
# printing, as qemu-img prints it


def format_stderr(result: CheckResult) -> str:
    """Everything qemu-img check writes to stderr: the check's lines, then "qemu-img: Check failed..." if it failed."""
    lines = [m + "\n" for m in result.messages]
    if result.error is not None:
        lines.append(f"qemu-img: Check failed: {result.error}\n")
    elif result.check_errors:
        lines.append("qemu-img: Check failed\n")
    return "".join(lines)


def format_human(result: CheckResult, path: str, fixed_requested: bool) -> tuple[str, str]:
    """qemu-img check's human output: (stdout text, stderr text). `path` is unused by the human format."""
    out: list[str] = []
    if fixed_requested and result.double_checked:
        out.append(
            "The following inconsistencies were found and repaired:\n\n"
            f"    {result.leaks_fixed} leaked clusters\n"
            f"    {result.corruptions_fixed} corruptions\n\n"
            "Double checking the fixed image now...\n"
        )
    if result.error is None:
        if not (result.corruptions or result.leaks or result.check_errors):
            out.append("No errors were found on the image.\n")
        else:
            if result.corruptions:
                out.append(
                    f"\n{result.corruptions} errors were found on the image.\n"
                    "Data may be corrupted, or further writes to the image may corrupt it.\n"
                )
            if result.leaks:
                out.append(
                    f"\n{result.leaks} leaked clusters were found on the image.\n"
                    "This means waste of disk space, but no harm to data.\n"
                )
            if result.check_errors:
                out.append(f"\n{result.check_errors} internal errors have occurred during the check.\n")
        if result.total_clusters and result.allocated_clusters:
            out.append(
                f"{result.allocated_clusters}/{result.total_clusters} = "
                f"{result.allocated_clusters * 100.0 / result.total_clusters:.2f}% allocated, "
                f"{result.fragmented_clusters * 100.0 / result.allocated_clusters:.2f}% fragmented, "
                f"{result.compressed_clusters * 100.0 / result.allocated_clusters:.2f}% compressed clusters\n"
            )
        if result.image_end_offset:
            out.append(f"Image end offset: {result.image_end_offset}\n")
    return "".join(out), format_stderr(result)


def _json_quote(text: str) -> str:
    """QEMU's JSON writer quoting: \\uXXXX (upper case) for everything outside 0x20..0x7e, surrogate pairs past the BMP."""
    out = ['"']
    raw = os.fsencode(text)
    for ch in raw.decode("utf-8", "replace"):
        cp = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch in "\b\f\n\r\t":
            out.append({"\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch])
        elif cp > 0xFFFF:
            out.append(f"\\u{0xD800 + ((cp - 0x10000) >> 10):04X}\\u{0xDC00 + ((cp - 0x10000) & 0x3FF):04X}")
        elif cp < 0x20 or cp >= 0x7F:
            out.append(f"\\u{cp:04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


# QEMU prints a QDict, whose iteration order is its hash-bucket order (tdb_hash % 512):
# computed once for these keys, no two share a bucket.
_JSON_ORDER = (
    "image-end-offset",
    "compressed-clusters",
    "total-clusters",
    "corruptions",
    "corruptions-fixed",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
)


def format_json(result: CheckResult, path: str) -> str:
    """qemu-img check --output=json's stdout; empty when the check failed (qemu-img prints no JSON then)."""
    if result.error is not None:
        return ""
    values: dict[str, str] = {
        "filename": _json_quote(path),
        "format": '"qcow2"',
        "check-errors": str(result.check_errors),
    }
    optional = {
        "image-end-offset": result.image_end_offset,
        "corruptions": result.corruptions,
        "leaks": result.leaks,
        "corruptions-fixed": result.corruptions_fixed,
        "leaks-fixed": result.leaks_fixed,
        "total-clusters": result.total_clusters,
        "allocated-clusters": result.allocated_clusters,
        "fragmented-clusters": result.fragmented_clusters,
        "compressed-clusters": result.compressed_clusters,
    }
    for key, value in optional.items():
        if value:
            values[key] = str(value)
    body = ",\n".join(f"    {_json_quote(key)}: {values[key]}" for key in _JSON_ORDER if key in values)
    return "{\n" + body + "\n}\n"


# --------------------------------------------------------------------------------------
# qcrash's strict leak rule: refcounts past the end of the file


def refcounts_past_eof(file: BlockFile) -> list[int]:
    """Clusters at or past the end of the file whose on-disk refcount is not 0.

    qemu-img check compares only clusters inside the file, so a refcount raised and
    flushed for a cluster whose own write (and the file growth it caused) was then lost
    in a crash stays invisible until the file grows over it, when it turns into a leak.
    The crash contract asks that every refcount equal the references, so qcrash's
    recovery looks past EOF too.
    """
    return [c for c, _off, _idx in _past_eof_entries(file)]


def drop_refcounts_past_eof(file: BlockFile) -> int:
    """Set every refcount past the end of the file to 0 (nothing can reference there); returns how many."""
    entries = list(_past_eof_entries(file))
    if not entries:
        return 0
    hdr = Header.unpack(read_exact(file, 0, 104))
    cs = 1 << hdr.cluster_bits
    blocks: dict[int, bytearray] = {}
    for _cluster, block_off, index in entries:
        block = blocks.setdefault(block_off, bytearray(read_exact(file, block_off, cs)))
        set_refcount(block, index, hdr.refcount_order, 0)
    for block_off, block in sorted(blocks.items()):
        file.pwrite(block_off, bytes(block), WriteSite.REPAIR)
    file.flush()
    return len(entries)


def _past_eof_entries(file: BlockFile) -> Iterable[tuple[int, int, int]]:
    hdr = Header.unpack(read_exact(file, 0, 104))
    cs = 1 << hdr.cluster_bits
    geo = Geometry(hdr.cluster_bits, hdr.refcount_order)
    size = file.size()
    first = -(-size // cs)
    n = hdr.refcount_table_clusters * cs // 8
    if n * 8 > spec.QCOW_MAX_REFTABLE_SIZE or hdr.refcount_table_offset % cs:
        return
    table = struct.unpack(f">{n}Q", read_exact(file, hdr.refcount_table_offset, n * 8))
    for ri in range(first // geo.refblock_entries, n):
        block_off = table[ri] & spec.REFT_OFFSET_MASK
        if not block_off or block_off % cs or block_off >= size:
            continue
        block = read_exact(file, block_off, cs)
        base = ri * geo.refblock_entries
        for idx, _value in _nonzero_refcounts(block, hdr.refcount_order, geo.refblock_entries):
            if base + idx >= first:
                yield base + idx, block_off, idx
