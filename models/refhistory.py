"""Each touched sector's history in the reference model: its durable value, the values pending after it, and the values it lost for good."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from models.blockio import SECTOR
from models.refops import Op
from models.refverdict import AllowedValue
from models.refvalues import INITIAL, ZERO_FINGERPRINT, Maker, Val, Values


def keys_in(mapping: dict[int, object], first: int, stop: int) -> list[int]:
    """The keys of `mapping` in [first, stop), by whichever walk is shorter."""
    if stop - first <= len(mapping):
        return [s for s in range(first, stop) if s in mapping]
    return [s for s in mapping if first <= s < stop]


class SectorHistory:
    """Every touched sector has a durable value; its current value is its last pending value, or the durable one."""

    def __init__(self) -> None:
        self.dur: dict[int, Val] = {}
        self.pending: dict[int, tuple[Val, ...]] = {}  # values after the durable point, in begin order
        self.past: dict[int, tuple[int | Maker, ...]] = {}  # fp, maker, fp, maker...: values lost for good

    def copy(self) -> SectorHistory:
        """An independent copy (every stored value is immutable, so this copies only the dicts)."""
        new = SectorHistory()
        new.dur = dict(self.dur)
        new.pending = dict(self.pending)
        new.past = dict(self.past)
        return new

    # ---- new values ---------------------------------------------------------------------------
    def current(self, sector: int) -> Val:
        pend = self.pending.get(sector)
        if pend:
            return pend[-1]
        return self.dur.get(sector, INITIAL)

    def push(self, sector: int, value: Val) -> None:
        if sector not in self.dur:
            if value.src is None:
                return  # zeros over a never-touched sector: nothing changes, nothing to remember
            self.dur[sector] = INITIAL
            self.pending[sector] = (value,)
        else:
            self.pending[sector] = self.pending.get(sector, ()) + (value,)

    def write(self, values: Values, offset: int, view: memoryview) -> None:
        """Push one value per sector `view` touches; a partly covered sector gets its current value patched."""
        end = offset + len(view)
        for sector in range(offset // SECTOR, -(-end // SECTOR)):
            base = sector * SECTOR
            lo = max(offset, base) - base
            hi = min(end, base + SECTOR) - base
            if lo == 0 and hi == SECTOR:
                chunk: bytes | bytearray | memoryview = view[base - offset : base - offset + SECTOR]
            else:
                patched = bytearray(self.current(sector).data(sector))
                patched[lo:hi] = view[base + lo - offset : base + hi - offset]
                chunk = patched
            self.push(sector, values.of(sector, chunk))

    def write_zeroes(self, values: Values, offset: int, length: int) -> None:
        """Zero [offset, offset+length): untouched sectors read zero already and stay untouched."""
        end = offset + length
        for sector in sorted(keys_in(self.dur, offset // SECTOR, -(-end // SECTOR))):
            base = sector * SECTOR
            lo = max(offset, base) - base
            hi = min(end, base + SECTOR) - base
            if lo == 0 and hi == SECTOR:
                self.push(sector, values.zeros)
            else:
                patched = bytearray(self.current(sector).data(sector))
                patched[lo:hi] = bytes(hi - lo)
                self.push(sector, values.of(sector, patched))

    def push_zeros(self, zeros: Val, first: int, stop: int) -> None:
        """Whole sectors [first, stop) get `zeros` (a discard); untouched ones stay untouched."""
        for sector in sorted(keys_in(self.dur, first, stop)):
            self.push(sector, zeros)

    def read(self, offset: int, length: int) -> bytes:
        """The current bytes of [offset, offset+length) (a checked range)."""
        end = offset + length
        zeros = memoryview(bytes(length))  # calloc'ed: free until touched
        parts: list[bytes | memoryview] = []
        pos = offset
        for sector in sorted(keys_in(self.dur, offset // SECTOR, -(-end // SECTOR))):
            value = self.current(sector)
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

    # ---- durability -----------------------------------------------------------------------------
    def make_durable(self, ops: set[int] | frozenset[int], first: int | None, stop: int | None,
                     live: dict[int, Op]) -> None:
        """Operations `ops` (all completed) become durable: on each sector, the last of their values is the durable one."""
        if not ops:
            return
        if first is None or stop is None:
            sectors = list(self.pending)
        else:
            sectors = keys_in(self.pending, first, stop)
        for sector in sectors:
            entries = self.pending[sector]
            j = len(entries) - 1
            while j >= 0 and entries[j].maker.op_index not in ops:
                j -= 1
            if j < 0:
                continue
            lost = [self.dur[sector]]
            keep = []
            for value in entries[:j]:
                # Superseded if it completed before; still possible while in flight.
                (lost if live[value.maker.op_index].completed else keep).append(value)  # type: ignore[index]
            keep.extend(entries[j + 1 :])
            new = entries[j]
            self.retire(sector, lost, new.fp)
            self.dur[sector] = new
            if keep:
                self.pending[sector] = tuple(keep)
            else:
                del self.pending[sector]
        for index in ops:
            live.pop(index, None)

    def adopt(self, chosen: dict[int, Val]) -> None:
        """After a crash: each pending sector's value read back becomes durable; nothing stays pending."""
        for sector, value in chosen.items():
            self.retire(sector, (self.dur[sector], *self.pending[sector]), value.fp)
            self.dur[sector] = value
        self.pending.clear()

    def retire(self, sector: int, values: Iterable[Val], keep_fingerprint: int) -> None:
        """Remember values `sector` lost for good, so a crash that shows one is called stale."""
        past = self.past.get(sector, ())
        known = set(past[::2])
        added: list[int | Maker] = []
        for value in values:
            fp = value.fp
            # The initial zeros need no memory: zeros not allowed are data loss anyway.
            if value is INITIAL or fp == keep_fingerprint or fp in known:
                continue
            known.add(fp)
            added += (fp, value.maker)
        if added:
            self.past[sector] = past + tuple(added)

    # ---- what a crash may leave -------------------------------------------------------------------
    def find(self, sector: int, fingerprint: int) -> Val | None:
        """The allowed value of `sector` with this fingerprint, if any."""
        durable = self.dur.get(sector)
        if durable is None:
            return INITIAL if fingerprint == ZERO_FINGERPRINT else None
        if durable.fp == fingerprint:
            return durable
        for value in self.pending.get(sector, ()):
            if value.fp == fingerprint:
                return value
        return None

    def allowed(self, sector: int, live: dict[int, Op]) -> list[AllowedValue]:
        durable = self.dur.get(sector, INITIAL)
        out = [AllowedValue(durable.fp, "durable", "durable", durable.maker.label)]
        for value in self.pending.get(sector, ()):
            label = value.maker.label
            state = "completed" if live[value.maker.op_index].completed else "in flight"  # type: ignore[index]
            out.append(AllowedValue(value.fp, label, state, label))
        return out

    def lost_maker(self, sector: int, fingerprint: int) -> Maker | None:
        """The maker of a value `sector` lost for good with this fingerprint, if any."""
        past = self.past.get(sector, ())
        lost = next((past[i + 1] for i in range(0, len(past), 2) if past[i] == fingerprint), None)
        return lost if isinstance(lost, Maker) else None

    def update_digest(self, h: "hashlib._Hash") -> None:
        """Hash the current, durable and pending values; all-zero sectors with nothing pending hash like untouched ones."""
        pack = struct.Struct(">QI").pack
        for sector in sorted(self.dur):
            durable = self.dur[sector]
            pend = self.pending.get(sector, ())
            if not pend and durable.src is None:
                continue
            h.update(pack(sector, durable.fp))
            for value in pend:
                h.update(f"|{value.maker.op_index}:{value.fp}".encode())
