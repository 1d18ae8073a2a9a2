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
"""

from __future__ import annotations

import enum
import hashlib
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import crcmod.predefined

from models.blockio import SECTOR, CacheMode
from models.payload import HEADER, MAGIC, SectorOrigin, describe, identify_sector, payload_sector
from models.refsnap import SnapshotsMixin

_ZERO_SECTOR = bytes(SECTOR)
_MAX_READ_SECTORS = 2048  # judge() and collapse() read at most 1 MiB per read_fn call

crc32c: Callable[[bytes | bytearray | memoryview], int] = crcmod.predefined.mkCrcFun("crc-32c")
"""CRC-32C (Castagnoli) of a buffer: the fingerprint of a sector value."""

ZERO_FINGERPRINT = crc32c(_ZERO_SECTOR)

ReadFn = Callable[[int, int], bytes]
"""read_fn(offset, length) -> bytes: reads `length` guest bytes of the recovered image."""


class GuestOpKind(enum.StrEnum):
    WRITE = "write"
    WRITE_ZEROES = "write_zeroes"
    DISCARD = "discard"
    FLUSH = "flush"


class Mismatch(enum.StrEnum):
    """Why a sector's value is not allowed."""

    FOREIGN = "foreign"  # an intact payload never allowed here: another sector's, or another operation's
    STALE_OR_LOST = "stale-or-lost"  # a value superseded before the durable point, or zeros not allowed: data lost
    GARBAGE = "garbage"  # nothing identifiable


class RefDiskError(Exception):
    """Base class of the reference disk's errors."""


class InvalidRequest(RefDiskError, ValueError):
    """A request the model refuses; the message names the operation, the field, the value and the rule."""


class CollapseError(RefDiskError):
    """collapse() read a sector value that no rule allows; `verdicts` says which sectors and why."""

    def __init__(self, verdicts: list[SectorVerdict]) -> None:
        self.verdicts = verdicts
        shown = "; ".join(str(v) for v in verdicts[:3])
        more = f" (and {len(verdicts) - 3} more)" if len(verdicts) > 3 else ""
        super().__init__(
            f"collapse: {len(verdicts)} sector(s) hold values the crash contract does not allow: {shown}{more}. "
            "Call judge() first and report those; collapse() only accepts a crash state that judge() accepts"
        )


class _Maker(NamedTuple):
    """Who made a value: one per operation, shared by every value it makes (op_index None: the initial zeros)."""

    op_index: int | None
    label: str  # "write #5", "discard #7 (zeros)", "initial zeros"


class _Val:
    """One 512-byte sector value, stored compactly; immutable by convention.

    src is None for zeros, an (op_index, seed) pair shared by one operation's values for
    an intact payload sector of the sector that holds it (rebuilt by payload_sector), or
    a full 512-byte copy of anything else.
    """

    __slots__ = ("fp", "maker", "src")

    def __init__(self, fp: int, maker: _Maker, src: tuple[int, int] | bytes | None) -> None:
        self.fp = fp
        self.maker = maker
        self.src = src

    def data(self, sector: int) -> bytes:
        src = self.src
        if src is None:
            return _ZERO_SECTOR
        if type(src) is bytes:
            return src
        return payload_sector(src[0], sector, src[1])  # type: ignore[index]

    def __repr__(self) -> str:
        kind = "zeros" if self.src is None else "raw" if type(self.src) is bytes else f"payload{self.src}"
        return f"<{self.maker.label}: {kind} crc32c {self.fp:#010x}>"


_INITIAL = _Val(ZERO_FINGERPRINT, _Maker(None, "initial zeros"), None)


class _Values:
    """Makes the values of one operation, sharing what they have in common."""

    __slots__ = ("maker", "zeros", "_keys")

    def __init__(self, op_index: int, label: str, zeros_label: str) -> None:
        self.maker = _Maker(op_index, label)
        self.zeros = _Val(ZERO_FINGERPRINT, _Maker(op_index, zeros_label), None)
        self._keys: dict[tuple[int, int], tuple[int, int]] = {}

    def of(self, sector: int, chunk: bytes | bytearray | memoryview) -> _Val:
        head = bytes(chunk[: HEADER.size])
        if head[: len(MAGIC)] == MAGIC:
            _, op_index, origin_sector, seed = HEADER.unpack(head)
            # Only a payload made for this very sector is rebuilt from its header; anything else is copied.
            if origin_sector == sector and payload_sector(op_index, sector, seed) == chunk:
                key = self._keys.setdefault((op_index, seed), (op_index, seed))
                return _Val(crc32c(chunk), self.maker, key)
        if chunk == _ZERO_SECTOR:
            return self.zeros
        return _Val(crc32c(chunk), self.maker, bytes(chunk))


class AllowedValue(NamedTuple):
    """A value a crash may leave in a sector.

    origin: "durable", or the operation whose value it is ("write #5", "discard #7 (zeros)").
    state: "durable", "completed" (not yet durable) or "in flight".
    source: what made the value ("write #3", "initial zeros"); equal to origin except for the durable value.
    """

    fingerprint: int
    origin: str
    state: str
    source: str

    def __str__(self) -> str:
        if self.state == "durable":
            return f"durable ({self.source}) [crc32c {self.fingerprint:#010x}]"
        flight = ", in flight" if self.state == "in flight" else ""
        return f"{self.origin}{flight} [crc32c {self.fingerprint:#010x}]"


@dataclass(frozen=True, slots=True)
class SectorVerdict:
    """A sector whose value no rule allows: what was read, whose data it is, and what was allowed."""

    sector: int
    kind: Mismatch
    observed_fingerprint: int
    origin: SectorOrigin | None  # identify_sector() of the observed bytes
    allowed: tuple[AllowedValue, ...]
    seen: str  # "sector 17 holds the data of write #5 to sector 42"
    reason: str  # why that is not allowed here

    @property
    def message(self) -> str:
        allowed = ", ".join(str(a) for a in self.allowed)
        return f"{self.kind}: {self.seen} [crc32c {self.observed_fingerprint:#010x}], {self.reason}; allowed: {allowed}"

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True, slots=True)
class _Op:
    """A live operation: in flight, or completed and not yet durable. Flushes keep what they cover."""

    index: int
    kind: GuestOpKind
    first: int  # sectors [first, stop) may hold its values
    stop: int
    completed: bool = False
    covers: frozenset[int] = frozenset()  # flush only: operations completed when it began


class ReferenceDisk(SnapshotsMixin):
    """The source of truth for a virtual disk: what reads return now, and what a crash may leave.

    Guest operations mirror the image's: begin_write / begin_write_zeroes / begin_discard /
    begin_flush when the image call is issued, complete(op_index) when it returns. The
    one-shot write / write_zeroes / discard / flush do both.
    """

    def __init__(self, size: int, cache_mode: str = "writeback", discard_granularity: int = SECTOR) -> None:
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
        self.size = size
        self.cache_mode = mode
        self.discard_granularity = discard_granularity
        # Every touched sector has a durable value; its current value is its last pending
        # value, or the durable one when nothing is pending.
        self._dur: dict[int, _Val] = {}
        self._pending: dict[int, tuple[_Val, ...]] = {}  # values after the durable point, in begin order
        self._past: dict[int, tuple[int | _Maker, ...]] = {}  # fp, maker, fp, maker...: values lost for good
        self._ops: dict[int, _Op] = {}  # live operations
        self._used: dict[int, GuestOpKind] = {}  # every operation index ever begun
        self._snaps = {}  # internal snapshots (models.refsnap): name -> sector values
        self._snap_op = None  # the snapshot operation in flight, if any

    # ----------------------------------------------------------------- guest operations

    def begin_write(self, op_index: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Operation `op_index` starts writing `data` at guest byte `offset`."""
        view = memoryview(data).cast("B")
        length = len(view)
        self._begin(GuestOpKind.WRITE, op_index, offset, length)
        values = _Values(op_index, f"write #{op_index}", f"write #{op_index}")
        end = offset + length
        for sector in range(offset // SECTOR, -(-end // SECTOR)):
            base = sector * SECTOR
            lo = max(offset, base) - base
            hi = min(end, base + SECTOR) - base
            if lo == 0 and hi == SECTOR:
                chunk: bytes | bytearray | memoryview = view[base - offset : base - offset + SECTOR]
            else:
                patched = bytearray(self._current(sector).data(sector))
                patched[lo:hi] = view[base + lo - offset : base + hi - offset]
                chunk = patched
            self._push(sector, values.of(sector, chunk))

    def begin_write_zeroes(self, op_index: int, offset: int, length: int) -> None:
        """Operation `op_index` starts zeroing guest bytes [offset, offset+length)."""
        self._begin(GuestOpKind.WRITE_ZEROES, op_index, offset, length)
        values = _Values(op_index, f"write_zeroes #{op_index}", f"write_zeroes #{op_index} (zeros)")
        end = offset + length
        # Untouched sectors read zero already and stay untouched.
        for sector in sorted(self._keys_in(self._dur, offset // SECTOR, -(-end // SECTOR))):
            base = sector * SECTOR
            lo = max(offset, base) - base
            hi = min(end, base + SECTOR) - base
            if lo == 0 and hi == SECTOR:
                self._push(sector, values.zeros)
            else:
                patched = bytearray(self._current(sector).data(sector))
                patched[lo:hi] = bytes(hi - lo)
                self._push(sector, values.of(sector, patched))

    def begin_discard(self, op_index: int, offset: int, length: int) -> None:
        """Operation `op_index` starts discarding [offset, offset+length): whole granules inside it read zero."""
        self._begin(GuestOpKind.DISCARD, op_index, offset, length)
        first, stop = self.discarded_sectors(offset, length)
        zeros = _Val(ZERO_FINGERPRINT, _Maker(op_index, f"discard #{op_index} (zeros)"), None)
        for sector in sorted(self._keys_in(self._dur, first, stop)):
            self._push(sector, zeros)

    def begin_flush(self, op_index: int) -> None:
        """Flush `op_index` is issued: it covers every operation completed by now."""
        self._check_new_index(GuestOpKind.FLUSH, op_index)
        covers = frozenset(i for i, op in self._ops.items() if op.completed and op.kind is not GuestOpKind.FLUSH)
        self._used[op_index] = GuestOpKind.FLUSH
        self._ops[op_index] = _Op(op_index, GuestOpKind.FLUSH, 0, 0, covers=covers)

    def complete(self, op_index: int) -> None:
        """Operation `op_index` has returned: apply the durability rule of its kind and the cache mode."""
        op = self._ops.get(op_index)
        if op is None or op.completed:
            if op_index in self._used:
                why = "is not in flight (it has completed already, or a crash ended it)"
            else:
                why = "was never begun"
            raise InvalidRequest(
                f"complete #{op_index}: operation #{op_index} {why}; only an operation in flight can complete"
            )
        if op.kind is GuestOpKind.FLUSH:
            del self._ops[op_index]
            self._make_durable(op.covers & self._ops.keys(), None, None)
        else:
            self._ops[op_index] = replace(op, completed=True)
            if self.cache_mode is not CacheMode.WRITEBACK and op.kind is not GuestOpKind.DISCARD:
                self._make_durable({op_index}, op.first, op.stop)
        if self._snap_op is not None:
            self._finish_snapshot(op_index)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *, op_index: int | None = None) -> int:
        """begin_write then complete; returns the operation index (the next free one unless given)."""
        op_index = self._index_or_next(op_index)
        self.begin_write(op_index, offset, data)
        self.complete(op_index)
        return op_index

    def write_zeroes(self, offset: int, length: int, *, op_index: int | None = None) -> int:
        """begin_write_zeroes then complete; returns the operation index."""
        op_index = self._index_or_next(op_index)
        self.begin_write_zeroes(op_index, offset, length)
        self.complete(op_index)
        return op_index

    def discard(self, offset: int, length: int, *, op_index: int | None = None) -> int:
        """begin_discard then complete; returns the operation index."""
        op_index = self._index_or_next(op_index)
        self.begin_discard(op_index, offset, length)
        self.complete(op_index)
        return op_index

    def flush(self, *, op_index: int | None = None) -> int:
        """begin_flush then complete; returns the operation index."""
        op_index = self._index_or_next(op_index)
        self.begin_flush(op_index)
        self.complete(op_index)
        return op_index

    def next_op_index(self) -> int:
        """One more than the largest operation index used so far (0 on a fresh disk)."""
        return max(self._used, default=-1) + 1

    # ----------------------------------------------------------------- reading and queries

    def read(self, offset: int, length: int) -> bytes:
        """What a guest read of [offset, offset+length) must return now, with no crash."""
        self._check_range("read", offset, length)
        end = offset + length
        zeros = memoryview(bytes(length))  # calloc'ed: free until touched
        parts: list[bytes | memoryview] = []
        pos = offset
        for sector in sorted(self._keys_in(self._dur, offset // SECTOR, -(-end // SECTOR))):
            value = self._current(sector)
            if value.src is None:
                continue
            base = sector * SECTOR
            lo = max(offset, base)
            hi = min(end, base + SECTOR)
            if lo > pos:
                parts.append(zeros[: lo - pos])
            data = value.data(sector)
            parts.append(data if hi - lo == SECTOR else data[lo - base : hi - base])
            pos = hi
        if not parts:
            return zeros.obj  # type: ignore[return-value]
        if pos < end:
            parts.append(zeros[: end - pos])
        return b"".join(parts)

    def discarded_sectors(self, offset: int, length: int) -> tuple[int, int]:
        """The sectors [first, stop) a discard of [offset, offset+length) zeroes (maybe none)."""
        g = self.discard_granularity
        end = offset + length
        lo = -(-offset // g) * g
        hi = end // g * g
        tail = self.size // g * g
        if end == self.size and tail < self.size and offset <= tail:
            hi = self.size  # the partial last granule, discarded whole (qcow2_co_pdiscard)
        if hi <= lo:
            return (0, 0)
        return (lo // SECTOR, hi // SECTOR)

    def touched_sectors(self) -> frozenset[int]:
        """Every sector with any history; all others have always read zero."""
        return frozenset(self._dur)

    def pending_sectors(self) -> frozenset[int]:
        """Sectors for which a crash may show more than one value."""
        return frozenset(self._pending)

    def live_ops(self) -> dict[int, str]:
        """Operations not yet durable: index -> "in flight" or "completed"."""
        return {i: ("completed" if op.completed else "in flight") for i, op in sorted(self._ops.items())}

    def allowed(self, sector: int) -> list[AllowedValue]:
        """The values a crash may leave in `sector`: the durable one first, then later ones in begin order."""
        self._check_sector("allowed", sector)
        return self._allowed(sector)

    # ----------------------------------------------------------------- crash judging

    def judge_sector(self, sector: int, data: bytes | bytearray | memoryview) -> SectorVerdict | None:
        """None when a crash may leave `data` in `sector`; otherwise the verdict saying why not."""
        self._check_sector("judge_sector", sector)
        if len(data) != SECTOR:
            raise InvalidRequest(f"judge_sector: data is {len(data)} bytes; a sector is exactly {SECTOR} bytes")
        fingerprint = crc32c(data)
        if self._find(sector, fingerprint) is not None:
            return None
        return self._classify(sector, fingerprint, data)

    def judge(self, read_fn: ReadFn, sectors: Iterable[int] | None = None) -> list[SectorVerdict]:
        """Judge the recovered image sector by sector; returns the verdicts of the sectors that broke the contract.

        `sectors` defaults to touched_sectors(): every other sector must read zero, and
        a caller that wants that checked too passes the sectors explicitly.
        """
        if sectors is None:
            wanted = sorted(self._dur)
        else:
            wanted = sorted(set(sectors))
            for sector in wanted[:1] + wanted[-1:]:
                self._check_sector("judge", sector)
        verdicts: list[SectorVerdict] = []
        find = self._find
        durable = self._dur
        for start, view in self._read_runs(read_fn, wanted, "judge"):
            count = len(view) // SECTOR
            if view == _ZERO_SECTOR * count:
                # All zeros (the common case for untouched space): only touched sectors can object.
                sectors = self._keys_in(durable, start, start + count)
                for sector in sectors:
                    if find(sector, ZERO_FINGERPRINT) is None:
                        k = (sector - start) * SECTOR
                        verdicts.append(self._classify(sector, ZERO_FINGERPRINT, view[k : k + SECTOR]))
                continue
            for k in range(count):
                chunk = view[k * SECTOR : (k + 1) * SECTOR]
                if start + k not in durable and chunk == _ZERO_SECTOR:
                    continue  # untouched and zero
                fingerprint = crc32c(chunk)
                if find(start + k, fingerprint) is None:
                    verdicts.append(self._classify(start + k, fingerprint, chunk))
        verdicts.sort(key=lambda v: v.sector)
        return verdicts

    def collapse(self, read_fn: ReadFn) -> None:
        """After a crash and recovery, adopt what the image holds: each pending sector's value becomes durable.

        Every sector with pending values is read; the allowed value it holds becomes its
        durable and current value, the others are remembered as lost, and every live
        operation (in flight or not yet durable) is forgotten. Raises CollapseError,
        changing nothing, if a sector holds a value that is not allowed.
        """
        chosen: dict[int, _Val] = {}
        bad: list[SectorVerdict] = []
        for start, view in self._read_runs(read_fn, sorted(self._pending), "collapse"):
            for k in range(len(view) // SECTOR):
                sector = start + k
                chunk = view[k * SECTOR : (k + 1) * SECTOR]
                fingerprint = crc32c(chunk)
                value = self._find(sector, fingerprint)
                if value is None:
                    bad.append(self._classify(sector, fingerprint, chunk))
                else:
                    chosen[sector] = value
        if bad:
            raise CollapseError(bad)
        for sector, value in chosen.items():
            self._retire(sector, (self._dur[sector], *self._pending[sector]), value.fp)
            self._dur[sector] = value
        self._pending.clear()
        self._ops.clear()

    # ----------------------------------------------------------------- state

    def copy(self) -> ReferenceDisk:
        """An independent copy (every stored value is immutable, so this copies only the dicts)."""
        new = ReferenceDisk.__new__(ReferenceDisk)
        new.size = self.size
        new.cache_mode = self.cache_mode
        new.discard_granularity = self.discard_granularity
        new._dur = dict(self._dur)
        new._pending = dict(self._pending)
        new._past = dict(self._past)
        new._ops = dict(self._ops)
        new._used = dict(self._used)
        new._snaps = dict(self._snaps)
        new._snap_op = self._snap_op
        return new

    def digest(self) -> str:
        """A stable SHA-256 of the state: geometry, current and durable values, pending values, live operations.

        Sectors that are zero, durable zero and have nothing pending hash like sectors
        never touched; the memory of lost values does not count.
        """
        h = hashlib.sha256(f"{self.size}|{self.cache_mode}|{self.discard_granularity}".encode())
        pack = struct.Struct(">QI").pack
        for sector in sorted(self._dur):
            durable = self._dur[sector]
            pend = self._pending.get(sector, ())
            if not pend and durable.src is None:
                continue
            h.update(pack(sector, durable.fp))
            for value in pend:
                h.update(f"|{value.maker.op_index}:{value.fp}".encode())
        for index, op in sorted(self._ops.items()):
            h.update(f"|op{index}:{op.kind}:{op.completed}:{sorted(op.covers)}".encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return (
            f"ReferenceDisk(size={self.size}, cache_mode={str(self.cache_mode)!r}, "
            f"discard_granularity={self.discard_granularity}) "
            f"<{len(self._dur)} touched, {len(self._pending)} pending, {len(self._ops)} live ops>"
        )

    # ----------------------------------------------------------------- internals

    def _index_or_next(self, op_index: int | None) -> int:
        return self.next_op_index() if op_index is None else op_index

    def _check_new_index(self, kind: GuestOpKind, op_index: int) -> None:
        if not isinstance(op_index, int) or op_index < 0:
            raise InvalidRequest(f"{kind} #{op_index}: op_index {op_index!r} is not a non-negative integer")
        used = self._used.get(op_index)
        if used is not None:
            raise InvalidRequest(
                f"{kind} #{op_index}: op_index {op_index} was already used by {used} #{op_index}; "
                "every guest operation needs its own index"
            )

    def _check_range(self, what: str, offset: int, length: int) -> None:
        if offset < 0:
            raise InvalidRequest(f"{what}: offset {offset} is negative; guest offsets must be >= 0")
        if length < 0:
            raise InvalidRequest(f"{what}: length {length} is negative; lengths must be >= 0")
        if offset + length > self.size:
            raise InvalidRequest(
                f"{what}: offset {offset} + length {length} = {offset + length} is past the end of the disk "
                f"(size {self.size}); a request must lie within the disk"
            )

    def _check_sector(self, what: str, sector: int) -> None:
        if not 0 <= sector < self.size // SECTOR:
            raise InvalidRequest(
                f"{what}: sector {sector} is outside the disk; sectors run from 0 to {self.size // SECTOR - 1}"
            )

    def _begin(self, kind: GuestOpKind, op_index: int, offset: int, length: int) -> None:
        self._check_new_index(kind, op_index)
        self._check_range(f"{kind} #{op_index}", offset, length)
        self._used[op_index] = kind
        if kind is GuestOpKind.DISCARD:
            first, stop = self.discarded_sectors(offset, length)
        else:
            first, stop = offset // SECTOR, -(-(offset + length) // SECTOR)
        self._ops[op_index] = _Op(op_index, kind, first, stop)

    def _current(self, sector: int) -> _Val:
        pend = self._pending.get(sector)
        if pend:
            return pend[-1]
        return self._dur.get(sector, _INITIAL)

    def _push(self, sector: int, value: _Val) -> None:
        if sector not in self._dur:
            if value.src is None:
                return  # zeros over a never-touched sector: nothing changes, nothing to remember
            self._dur[sector] = _INITIAL
            self._pending[sector] = (value,)
        else:
            self._pending[sector] = self._pending.get(sector, ()) + (value,)

    @staticmethod
    def _keys_in(mapping: dict[int, object], first: int, stop: int) -> list[int]:
        """The keys of `mapping` in [first, stop), by whichever walk is shorter."""
        if stop - first <= len(mapping):
            return [s for s in range(first, stop) if s in mapping]
        return [s for s in mapping if first <= s < stop]

    def _make_durable(self, ops: set[int] | frozenset[int], first: int | None, stop: int | None) -> None:
        """Operations `ops` (all completed) become durable: on each sector, the last of their values is the durable one."""
        if not ops:
            return
        if first is None or stop is None:
            sectors = list(self._pending)
        else:
            sectors = self._keys_in(self._pending, first, stop)
        live = self._ops
        for sector in sectors:
            entries = self._pending[sector]
            j = len(entries) - 1
            while j >= 0 and entries[j].maker.op_index not in ops:
                j -= 1
            if j < 0:
                continue
            lost = [self._dur[sector]]
            keep = []
            for value in entries[:j]:
                # Superseded if it completed before; still possible while in flight.
                (lost if live[value.maker.op_index].completed else keep).append(value)  # type: ignore[index]
            keep.extend(entries[j + 1 :])
            new = entries[j]
            self._retire(sector, lost, new.fp)
            self._dur[sector] = new
            if keep:
                self._pending[sector] = tuple(keep)
            else:
                del self._pending[sector]
        for index in ops:
            live.pop(index, None)

    def _retire(self, sector: int, values: Iterable[_Val], keep_fingerprint: int) -> None:
        """Remember values `sector` lost for good, so a crash that shows one is called stale."""
        past = self._past.get(sector, ())
        known = set(past[::2])
        added: list[int | _Maker] = []
        for value in values:
            fp = value.fp
            # The initial zeros need no memory: zeros not allowed are data loss anyway.
            if value is _INITIAL or fp == keep_fingerprint or fp in known:
                continue
            known.add(fp)
            added += (fp, value.maker)
        if added:
            self._past[sector] = past + tuple(added)

    def _find(self, sector: int, fingerprint: int) -> _Val | None:
        """The allowed value of `sector` with this fingerprint, if any."""
        durable = self._dur.get(sector)
        if durable is None:
            return _INITIAL if fingerprint == ZERO_FINGERPRINT else None
        if durable.fp == fingerprint:
            return durable
        for value in self._pending.get(sector, ()):
            if value.fp == fingerprint:
                return value
        return None

    def _allowed(self, sector: int) -> list[AllowedValue]:
        durable = self._dur.get(sector, _INITIAL)
        out = [AllowedValue(durable.fp, "durable", "durable", durable.maker.label)]
        for value in self._pending.get(sector, ()):
            label = value.maker.label
            state = "completed" if self._ops[value.maker.op_index].completed else "in flight"  # type: ignore[index]
            out.append(AllowedValue(value.fp, label, state, label))
        return out

    def _classify(self, sector: int, fingerprint: int, data: bytes | bytearray | memoryview) -> SectorVerdict:
        origin = identify_sector(data)
        seen = describe(sector, data)
        past = self._past.get(sector, ())
        lost = next((past[i + 1] for i in range(0, len(past), 2) if past[i] == fingerprint), None)
        if isinstance(lost, _Maker):
            kind = Mismatch.STALE_OR_LOST
            reason = f"a value it held before its durable point ({lost.label}): data lost"
        elif fingerprint == ZERO_FINGERPRINT and data == _ZERO_SECTOR:
            kind = Mismatch.STALE_OR_LOST
            reason = "but no durable value or pending zeroing allows zeros here: data lost"
        elif origin is not None:
            kind = Mismatch.FOREIGN
            reason = f"which was never allowed in sector {sector}"
        else:
            kind = Mismatch.GARBAGE
            reason = "not a value any operation wrote here"
        return SectorVerdict(sector, kind, fingerprint, origin, tuple(self._allowed(sector)), seen, reason)

    def _read_runs(self, read_fn: ReadFn, sectors: list[int], what: str) -> Iterator[tuple[int, memoryview]]:
        """Read sorted `sectors` in runs of consecutive ones (at most 1 MiB each); yield (first sector, the run's bytes)."""
        i = 0
        n = len(sectors)
        while i < n:
            start = sectors[i]
            j = i + 1
            while j < n and sectors[j] == start + (j - i) and j - i < _MAX_READ_SECTORS:
                j += 1
            count = j - i
            data = read_fn(start * SECTOR, count * SECTOR)
            if len(data) != count * SECTOR:
                raise RefDiskError(
                    f"{what}: read_fn({start * SECTOR}, {count * SECTOR}) returned {len(data)} bytes; "
                    "it must return exactly the bytes asked for"
                )
            yield start, memoryview(data)
            i = j
