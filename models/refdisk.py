"""ReferenceDisk: the byte-exact model of a virtual disk under the crash contract, and the judge of what a crash may leave in each guest sector.

The rules it encodes (harness/CRASH-CONTRACT.md, "What the image promises about
guest data"), and the choices made where the contract leaves room:

Operations. Every guest operation has an index chosen by the caller (the harness
numbers its operation sequence; payloads carry the same number, see `models.payload`).
An operation *begins* when the image call is issued and *completes* when it returns;
in between it is **in flight** and a crash may show its value or not. `read()` always
answers as if every begun operation had taken effect, in the order they began: the
harness issues one call at a time, so by the time it reads, the call has returned.

Durability. After completion:

- writeback: write, write_zeroes and discard become durable at the next completed
  flush;
- writethrough and directsync: write and write_zeroes are durable as soon as they
  complete; discard only at the next completed flush;
- a completed flush makes durable every operation that had completed when the flush
  began. (The harness never completes an operation while a flush is in flight, so
  "when it began" and "when it completed" agree there; taking the earlier point is the
  one QEMU's flush actually promises.)

Discard. qcow2 discards whole clusters only: the block layer cuts the unaligned head
and tail off a discard request and qcow2 refuses a partial cluster, except the partial
last cluster of a disk whose size is not a multiple of the cluster size, when the
request runs to the end of the disk (`qcow2_co_pdiscard`). The model does the same with
`discard_granularity` (the cluster size): whole granules inside the request read zero
afterwards, the head and the tail keep their data. write_zeroes zeroes every byte.

Crash judging. A sector (512 bytes) is judged on its own. It may read as:

1. its **durable value**, the value it held when the last durability point for it
   passed; or
2. the value of any operation on it after that point: completed but not durable, or in
   flight. Zeros count as the value of a discard or write_zeroes.

When an operation becomes durable on a sector, the values of earlier *completed*
operations there are superseded and leave the allowed set; earlier operations still in
flight stay allowed (an in-flight write may yet land). Values the sector held and then
lost this way are remembered, so a verdict can say "stale": a crash that shows one lost
data the contract promised to keep.

Verdicts. A value outside the allowed set is `foreign` (an intact payload sector made
for another sector, or by an operation that never wrote here: data crossed over),
`stale-or-lost` (a value the sector held before its durable point, or zeros where no
zeroing is allowed) or `garbage` (nothing identifiable).

Judging compares CRC-32C fingerprints of whole sectors; a verdict then looks at the
bytes themselves (`models.payload.identify_sector`) to say whose data it saw.

Storage. Each value is its fingerprint plus what it takes to rebuild the bytes: nothing
for zeros, an (op, seed) pair shared by the whole operation for an intact payload
sector made for the sector that holds it (the sector number is the key), a full
512-byte copy for anything else. That is about 170 bytes per payload sector on 64-bit
CPython. Never-touched sectors cost nothing and read zero; zeros written to a
never-touched sector leave it untouched. Lost values are remembered by fingerprint
only, and the initial zeros not at all (zeros that are not allowed are data loss
whatever their history).

Sub-sector writes. `read()` is byte exact for any offset and length. For judging, a
write that covers part of a sector makes a whole new sector value: the sector's current
value with those bytes patched in. That is exact when the patched-over value is the one
a crash would keep; it is not when a crash could drop an earlier pending operation
under the patch. So crash judging is exact for 512-aligned operations, which are the
only kind the harness generates for crash runs.

Where each part lives: sector values in `models.refvalues`, each sector's history and
the durability step in `models.refhistory`, the operation log in `models.refops`,
crash judging in `models.refjudge`, verdicts and errors in `models.refverdict`,
snapshots in `models.refsnap`. This class is the API over them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from models.blockio import SECTOR, CacheMode
from models.refhistory import SectorHistory
from models.refjudge import ReadFn, collapse, judge, judge_sector, judge_view
from models.refops import GuestOpKind, OpLog, check_range, check_sector, discarded_sectors
from models.refsnap import Snapshots
from models.refverdict import AllowedValue, CollapseError, InvalidRequest, Mismatch, RefDiskError, SectorVerdict
from models.refvalues import ZERO_FINGERPRINT, Maker, Val, Values, crc32c, zeros_of

__all__ = ["AllowedValue", "CollapseError", "GuestOpKind", "InvalidRequest", "Mismatch", "ReadFn", "RefDiskError",
           "ReferenceDisk", "SectorVerdict", "ZERO_FINGERPRINT", "crc32c"]


class ReferenceDisk:
    """The source of truth for a virtual disk: what reads return now, and what a crash may leave.

    Guest operations mirror the image's: begin_write / begin_write_zeroes / begin_discard /
    begin_flush when the image call is issued, complete(op_index) when it returns. The
    one-shot write / write_zeroes / discard / flush do both.
    """

    def __init__(self, size: int, cache_mode: str = "writeback", discard_granularity: int = SECTOR) -> None:
        mode = _checked_mode(size, cache_mode, discard_granularity)
        self.size = size
        self.cache_mode = mode
        self.discard_granularity = discard_granularity
        self.history = SectorHistory()
        self.log = OpLog()
        self.snapshots = Snapshots(self)

    # ----------------------------------------------------------------- guest operations
    def begin_write(self, op_index: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Operation `op_index` starts writing `data` at guest byte `offset`."""
        view = memoryview(data).cast("B")
        self._begin(GuestOpKind.WRITE, op_index, offset, len(view))
        self.history.write(Values(op_index, f"write #{op_index}", f"write #{op_index}"), offset, view)

    def begin_write_zeroes(self, op_index: int, offset: int, length: int) -> None:
        """Operation `op_index` starts zeroing guest bytes [offset, offset+length)."""
        self._begin(GuestOpKind.WRITE_ZEROES, op_index, offset, length)
        values = Values(op_index, f"write_zeroes #{op_index}", f"write_zeroes #{op_index} (zeros)")
        self.history.write_zeroes(values, offset, length)

    def begin_discard(self, op_index: int, offset: int, length: int) -> None:
        """Operation `op_index` starts discarding [offset, offset+length): whole granules inside it read zero."""
        self._begin(GuestOpKind.DISCARD, op_index, offset, length)
        first, stop = self.discarded_sectors(offset, length)
        self.history.push_zeros(zeros_of(Maker(op_index, f"discard #{op_index} (zeros)")), first, stop)

    def begin_flush(self, op_index: int) -> None:
        """Flush `op_index` is issued: it covers every operation completed by now."""
        self.log.begin_flush(op_index)

    def complete(self, op_index: int) -> None:
        """Operation `op_index` has returned: apply the durability rule of its kind and the cache mode."""
        durable = self.log.complete(op_index, self.cache_mode)
        if durable is not None:
            self.history.make_durable(*durable, self.log.live)
        if self.snapshots.op is not None:
            self.snapshots.finish(op_index)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, op_index: int | None = None) -> int:
        """begin_write then complete; returns the operation index (the next free one unless given)."""
        return self._one_shot(self.begin_write, op_index, offset, data)

    def write_zeroes(self, offset: int, length: int, *, op_index: int | None = None) -> int:
        """begin_write_zeroes then complete; returns the operation index."""
        return self._one_shot(self.begin_write_zeroes, op_index, offset, length)

    def discard(self, offset: int, length: int, *, op_index: int | None = None) -> int:
        """begin_discard then complete; returns the operation index."""
        return self._one_shot(self.begin_discard, op_index, offset, length)

    def flush(self, *, op_index: int | None = None) -> int:
        """begin_flush then complete; returns the operation index."""
        return self._one_shot(self.begin_flush, op_index)

    def next_op_index(self) -> int:
        """One more than the largest operation index used so far (0 on a fresh disk)."""
        return self.log.next_index()

    # ----------------------------------------------------------------- reading and queries
    def read(self, offset: int, length: int) -> bytes:
        """What a guest read of [offset, offset+length) must return now, with no crash."""
        check_range(self.size, "read", offset, length)
        return self.history.read(offset, length)

    def discarded_sectors(self, offset: int, length: int) -> tuple[int, int]:
        """The sectors [first, stop) a discard of [offset, offset+length) zeroes (maybe none)."""
        return discarded_sectors(self.size, self.discard_granularity, offset, length)

    def touched_sectors(self) -> frozenset[int]:
        """Every sector with any history; all others have always read zero."""
        return frozenset(self.history.dur)

    def pending_sectors(self) -> frozenset[int]:
        """Sectors for which a crash may show more than one value."""
        return frozenset(self.history.pending)

    def live_ops(self) -> dict[int, str]:
        """Operations not yet durable: index -> "in flight" or "completed"."""
        return self.log.states()

    def allowed(self, sector: int) -> list[AllowedValue]:
        """The values a crash may leave in `sector`: the durable one first, then later ones in begin order."""
        check_sector(self.size, "allowed", sector)
        return self.history.allowed(sector, self.log.live)

    # ----------------------------------------------------------------- crash judging (models.refjudge)
    def judge_sector(self, sector: int, data: bytes | bytearray | memoryview) -> SectorVerdict | None:
        """None when a crash may leave `data` in `sector`; otherwise the verdict saying why not."""
        check_sector(self.size, "judge_sector", sector)
        if len(data) != SECTOR:
            raise InvalidRequest(f"judge_sector: data is {len(data)} bytes; a sector is exactly {SECTOR} bytes")
        return judge_sector(self.history, self.log.live, sector, data)

    def judge(self, read_fn: ReadFn, sectors: Iterable[int] | None = None) -> list[SectorVerdict]:
        """Judge the recovered image sector by sector; returns the verdicts of the sectors that broke the contract.

        `sectors` defaults to touched_sectors(): every other sector must read zero, and
        a caller that wants that checked too passes the sectors explicitly.
        """
        if sectors is None:
            wanted = sorted(self.history.dur)
        else:
            wanted = sorted(set(sectors))
            for sector in wanted[:1] + wanted[-1:]:
                check_sector(self.size, "judge", sector)
        return judge(self.history, self.log.live, read_fn, wanted)

    def judge_view(self, view: dict[int, bytes]) -> list[SectorVerdict]:
        """`judge` on the sectors of a read view (sector -> 512 bytes), every one of them: the same verdicts,
        without joining the view into runs and splitting them again."""
        wanted = sorted(view)
        for sector in wanted[:1] + wanted[-1:]:
            check_sector(self.size, "judge", sector)
        return judge_view(self.history, self.log.live, view, wanted)

    def collapse(self, read_fn: ReadFn) -> None:
        """After a crash and recovery, adopt what the image holds: each pending sector's value becomes durable.

        Every sector with pending values is read; the allowed value it holds becomes its
        durable and current value, the others are remembered as lost, and every live
        operation (in flight or not yet durable) is forgotten. Raises CollapseError,
        changing nothing, if a sector holds a value that is not allowed.
        """
        collapse(self.history, self.log.live, read_fn)

    # ----------------------------------------------------------------- snapshots (models.refsnap)
    def begin_snapshot_create(self, op_index: int, name: str) -> None:
        self.snapshots.begin_create(op_index, name)

    def begin_snapshot_delete(self, op_index: int, name: str) -> None:
        self.snapshots.begin_delete(op_index, name)

    def begin_snapshot_apply(self, op_index: int, name: str) -> None:
        self.snapshots.begin_apply(op_index, name)

    def snapshot_in_flight(self) -> bool:
        return self.snapshots.in_flight()

    def snapshot_names(self) -> list[str]:
        return self.snapshots.names()

    def snapshot_outcomes(self) -> list[frozenset[str]]:
        return self.snapshots.outcomes()

    def snapshot_view(self, name: str) -> dict[int, Val]:
        return self.snapshots.view(name)

    def snapshot_mismatch(self, name: str, read_fn: ReadFn, sectors: list[int]) -> str | None:
        return self.snapshots.mismatch(name, read_fn, sectors)

    def snapshot_mismatch_view(self, name: str, got: dict[int, bytes], sectors: list[int]) -> str | None:
        """snapshot_mismatch on sectors read already: "" when all match, None when `got` lacks some."""
        return self.snapshots.mismatch_view(name, got, sectors)

    def half_applied(self, read_fn: ReadFn, span: int) -> str | None:
        return self.snapshots.half_applied(read_fn, span)

    def settle_snapshots(self, names: frozenset[str]) -> None:
        self.snapshots.settle(names)

    # ----------------------------------------------------------------- state
    def copy(self) -> ReferenceDisk:
        """An independent copy (every stored value is immutable, so this copies only the dicts)."""
        new = ReferenceDisk.__new__(ReferenceDisk)
        new.size = self.size
        new.cache_mode = self.cache_mode
        new.discard_granularity = self.discard_granularity
        new.history = self.history.copy()
        new.log = self.log.copy()
        new.snapshots = self.snapshots.copy(new)
        return new

    def digest(self) -> str:
        """A stable SHA-256 of the state: geometry, current and durable values, pending values, live operations.

        Sectors that are zero, durable zero and have nothing pending hash like sectors
        never touched; the memory of lost values does not count.
        """
        h = hashlib.sha256(f"{self.size}|{self.cache_mode}|{self.discard_granularity}".encode())
        self.history.update_digest(h)
        for index, op in sorted(self.log.live.items()):
            h.update(f"|op{index}:{op.kind}:{op.completed}:{sorted(op.covers)}".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"ReferenceDisk(size={self.size}, cache_mode={str(self.cache_mode)!r}, "
            f"discard_granularity={self.discard_granularity}) "
            f"<{len(self.history.dur)} touched, {len(self.history.pending)} pending, {len(self.log.live)} live ops>"
        )

    # ----------------------------------------------------------------- internals
    def _one_shot(self, begin, op_index: int | None, *args) -> int:
        op_index = self.next_op_index() if op_index is None else op_index
        begin(op_index, *args)
        self.complete(op_index)
        return op_index

    def _begin(self, kind: GuestOpKind, op_index: int, offset: int, length: int) -> None:
        self.log.begin(kind, op_index, offset, length, self.size, self.discard_granularity)


def _checked_mode(size: int, cache_mode: str, discard_granularity: int) -> CacheMode:
    """The cache mode of a new disk, once its size and discard granularity are checked (a named error otherwise)."""
    if not isinstance(size, int) or size <= 0 or size % SECTOR:
        raise InvalidRequest(
            f"ReferenceDisk: size {size!r} is not a positive multiple of {SECTOR}; "
            "a virtual disk is a whole number of sectors"
        )
    try:
        mode = CacheMode(cache_mode)
    except ValueError:
        raise InvalidRequest(
            f"ReferenceDisk: cache_mode {cache_mode!r} is not one of " + ", ".join(m.value for m in CacheMode)
        ) from None
    if not isinstance(discard_granularity, int) or discard_granularity <= 0 or discard_granularity % SECTOR:
        raise InvalidRequest(
            f"ReferenceDisk: discard_granularity {discard_granularity!r} is not a positive multiple of "
            f"{SECTOR}; discard works on whole sectors (in qcow2, whole clusters)"
        )
    return mode
