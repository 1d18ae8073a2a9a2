"""Property tests for models.refdisk: the model against a plain bytearray disk, and crash judging against crash images built by hand from the contract's own words."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from hypothesis import assume, given, note
from hypothesis import strategies as st

from models.blockio import SECTOR
from models.payload import SectorOrigin, make_payload, payload_sector
from models.refdisk import ZERO_FINGERPRINT, Mismatch, ReferenceDisk

SEED = 11
MODES = ["writeback", "writethrough", "directsync"]


# --------------------------------------------------------------------------- the plain model


def discard_ranges(offset: int, length: int, size: int, granularity: int) -> list[tuple[int, int]]:
    """Byte ranges a discard zeroes: each granule (cut at the disk end) lying wholly inside the request."""
    out = []
    for start in range(0, size, granularity):
        end = min(start + granularity, size)
        if offset <= start and end <= offset + length:
            out.append((start, end))
    return out


@dataclass
class Op:
    kind: str  # write | zeroes | discard | flush
    offset: int = 0
    length: int = 0
    fill: str = "payload"  # write only: payload | moved | random | zeros | byte
    fill_seed: int = 0

    def data(self, op_index: int) -> bytes:
        if self.fill == "payload":
            return make_payload(op_index, self.offset, self.length, SEED)
        if self.fill == "moved":  # another place's payload, as a guest copying data would write
            return make_payload(op_index, self.offset + SECTOR * (1 + self.fill_seed % 7), self.length, SEED)
        if self.fill == "random":
            return random.Random(self.fill_seed).randbytes(self.length)
        if self.fill == "zeros":
            return bytes(self.length)
        return bytes([self.fill_seed % 256]) * self.length


@st.composite
def geometries(draw: st.DrawFn) -> tuple[int, str, int]:
    size = draw(st.integers(4, 48)) * SECTOR
    mode = draw(st.sampled_from(MODES))
    granularity = draw(st.sampled_from([512, 1024, 2048, 4096]))
    return size, mode, granularity


@st.composite
def ops(draw: st.DrawFn, size: int, aligned: bool) -> Op:
    kind = draw(st.sampled_from(["write", "write", "write", "zeroes", "discard", "flush"]))
    if kind == "flush":
        return Op("flush")
    if aligned:
        first = draw(st.integers(0, size // SECTOR - 1))
        # Short requests, or requests that run to the end of the disk (the partial last granule).
        count = draw(st.one_of(st.integers(0, min(8, size // SECTOR - first)), st.just(size // SECTOR - first)))
        offset, length = first * SECTOR, count * SECTOR
    else:
        offset = draw(st.one_of(st.integers(0, size), st.integers(0, size // SECTOR).map(lambda s: s * SECTOR)))
        length = draw(
            st.one_of(st.integers(0, min(size - offset, 2048)), st.integers(0, size - offset), st.just(size - offset))
        )
    fill = draw(st.sampled_from(["payload", "payload", "moved", "random", "zeros", "byte"]))
    return Op(kind, offset, length, fill, draw(st.integers(0, 2**32)))


def apply_plain(image: bytearray, op: Op, op_index: int, granularity: int) -> None:
    if op.kind == "write":
        image[op.offset : op.offset + op.length] = op.data(op_index)
    elif op.kind == "zeroes":
        image[op.offset : op.offset + op.length] = bytes(op.length)
    elif op.kind == "discard":
        for start, end in discard_ranges(op.offset, op.length, len(image), granularity):
            image[start:end] = bytes(end - start)


def begin(disk: ReferenceDisk, op: Op, op_index: int) -> None:
    if op.kind == "write":
        disk.begin_write(op_index, op.offset, op.data(op_index))
    elif op.kind == "zeroes":
        disk.begin_write_zeroes(op_index, op.offset, op.length)
    elif op.kind == "discard":
        disk.begin_discard(op_index, op.offset, op.length)
    else:
        disk.begin_flush(op_index)


# --------------------------------------------------------------------------- the crash contract, stated plainly


@dataclass
class LogEntry:
    op_index: int
    op: Op
    effect: dict[int, bytes]  # sector -> the 512 bytes the operation puts there
    durable: bool = False


@dataclass
class Shadow:
    """A bytearray disk plus the contract as written: a crash keeps the image as of the last completed flush,
    every operation made durable since, and any subset (torn at sector boundaries) of the others, in order."""

    size: int
    mode: str
    granularity: int
    current: bytearray = field(init=False)
    flushed: bytearray = field(init=False)
    log: list[LogEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.current = bytearray(self.size)
        self.flushed = bytearray(self.size)

    def begin(self, op: Op, op_index: int) -> LogEntry | None:
        if op.kind == "flush":
            return None
        apply_plain(self.current, op, op_index, self.granularity)
        if op.kind == "discard":
            ranges = discard_ranges(op.offset, op.length, self.size, self.granularity)
        else:
            ranges = [(op.offset, op.offset + op.length)]
        effect = {
            s: bytes(self.current[s * SECTOR : (s + 1) * SECTOR])
            for start, end in ranges
            for s in range(start // SECTOR, end // SECTOR)
        }
        entry = LogEntry(op_index, op, effect)
        self.log.append(entry)
        return entry

    def complete(self, op: Op, entry: LogEntry | None) -> None:
        if op.kind == "flush":  # only issued when nothing is in flight
            self.flushed = bytearray(self.current)
            self.log.clear()
        elif self.mode != "writeback" and op.kind in ("write", "zeroes"):
            entry.durable = True  # type: ignore[union-attr]

    def crash_image(self, rng: random.Random, how: str) -> bytearray:
        image = bytearray(self.flushed)
        for entry in self.log:
            for sector, data in entry.effect.items():
                keep = entry.durable or how == "all" or (how == "random" and rng.random() < 0.5)
                if keep:
                    image[sector * SECTOR : (sector + 1) * SECTOR] = data
        return image


def run_ops(disk: ReferenceDisk, shadow: Shadow, op_list: list[Op], first_index: int) -> int:
    index = first_index
    for op in op_list:
        entry = shadow.begin(op, index)
        begin(disk, op, index)
        shadow.complete(op, entry)
        disk.complete(index)
        index += 1
    return index


def run_in_flight(disk: ReferenceDisk, shadow: Shadow, op_list: list[Op], first_index: int) -> int:
    index = first_index
    for op in op_list:
        shadow.begin(op, index)
        begin(disk, op, index)
        index += 1
    return index


def reader(image: bytes | bytearray):
    return lambda offset, length: bytes(image[offset : offset + length])


@st.composite
def crash_scenarios(draw: st.DrawFn):
    size, mode, granularity = draw(geometries())
    done = draw(st.lists(ops(size, aligned=True), max_size=14))
    flying = draw(st.lists(ops(size, aligned=True).filter(lambda o: o.kind != "flush"), max_size=3))
    how = draw(st.sampled_from(["none", "all", "random"]))
    rng_seed = draw(st.integers(0, 2**32))
    return size, mode, granularity, done, flying, how, rng_seed


def build_crash(scenario) -> tuple[ReferenceDisk, Shadow, bytearray, int]:
    size, mode, granularity, done, flying, how, rng_seed = scenario
    disk = ReferenceDisk(size, mode, granularity)
    shadow = Shadow(size, mode, granularity)
    index = run_ops(disk, shadow, done, 0)
    index = run_in_flight(disk, shadow, flying, index)
    image = shadow.crash_image(random.Random(rng_seed), how)
    return disk, shadow, image, index


# --------------------------------------------------------------------------- properties


@given(geometries(), st.data())
def test_without_crashes_the_model_is_a_bytearray_disk(geometry, data) -> None:
    size, mode, granularity = geometry
    disk = ReferenceDisk(size, mode, granularity)
    image = bytearray(size)
    op_list = data.draw(st.lists(ops(size, aligned=False), max_size=20))
    for index, op in enumerate(op_list):
        apply_plain(image, op, index, granularity)
        begin(disk, op, index)
        disk.complete(index)
        assert disk.read(0, size) == image, f"after op #{index} {op}"
    windows = data.draw(st.lists(st.tuples(st.integers(0, size), st.integers(0, 1600)), max_size=5))
    for offset, length in windows:
        length = min(length, size - offset)
        assert disk.read(offset, length) == image[offset : offset + length]


@given(crash_scenarios())
def test_judge_accepts_every_crash_image_the_contract_allows(scenario) -> None:
    disk, _, image, _ = build_crash(scenario)
    verdicts = disk.judge(reader(image))
    assert verdicts == [], "\n".join(map(str, verdicts))
    # Sectors never touched read zero in every crash image, and judging them explicitly agrees.
    assert disk.judge(reader(image), sectors=range(len(image) // SECTOR)) == []


@given(crash_scenarios(), st.data())
def test_judge_rejects_zeros_where_zeros_are_not_allowed(scenario, data) -> None:
    disk, _, image, _ = build_crash(scenario)
    candidates = [s for s in sorted(disk.touched_sectors()) if all(a.fingerprint != ZERO_FINGERPRINT for a in disk.allowed(s))]
    assume(candidates)
    sector = data.draw(st.sampled_from(candidates))
    image[sector * SECTOR : (sector + 1) * SECTOR] = bytes(SECTOR)
    verdicts = disk.judge(reader(image))
    assert [(v.sector, v.kind) for v in verdicts] == [(sector, Mismatch.STALE_OR_LOST)]


@given(crash_scenarios(), st.data())
def test_foreign_payload_is_rejected_and_named(scenario, data) -> None:
    disk, _, image, next_index = build_crash(scenario)
    # Every payload sector any operation wrote, by (op, sector); operation indices run from 0 in scenario order.
    all_ops = scenario[3] + scenario[4]
    written = {
        (i, s)
        for i, op in enumerate(all_ops)
        if op.kind == "write" and op.fill == "payload"
        for s in range(op.offset // SECTOR, (op.offset + op.length) // SECTOR)
    }
    touched = sorted(disk.touched_sectors())
    assume(touched)
    target = data.draw(st.sampled_from(touched))
    ever_wrote_target = {
        i for i, op in enumerate(all_ops) if op.kind == "write" and op.offset <= target * SECTOR < op.offset + op.length
    }
    choices = [(op, s) for op, s in sorted(written) if s != target]
    # Another operation's payload for this very sector, from an op that never wrote it (or that never existed).
    strangers = [i for i in range(next_index + 2) if i not in ever_wrote_target]
    kind = data.draw(st.sampled_from(["other-sector", "other-op"] if choices else ["other-op"]))
    if kind == "other-sector":
        op_index, sector = data.draw(st.sampled_from(choices))
    else:
        op_index, sector = data.draw(st.sampled_from(strangers)), target
    note(f"sector {target} gets the payload of write #{op_index} to sector {sector}")
    image[target * SECTOR : (target + 1) * SECTOR] = payload_sector(op_index, sector, SEED)
    verdict = disk.judge_sector(target, image[target * SECTOR : (target + 1) * SECTOR])
    assert verdict is not None
    assert verdict.kind is Mismatch.FOREIGN
    assert verdict.origin == SectorOrigin(op_index, sector, SEED)
    assert f"sector {target} holds the data of write #{op_index} to sector {sector}" in str(verdict)
    assert [v.sector for v in disk.judge(reader(image))] == [target]


@given(crash_scenarios(), st.lists(st.integers(0, 2**32), max_size=2), st.data())
def test_collapse_then_continue_matches_a_bytearray_disk(scenario, later_rounds, data) -> None:
    disk, shadow, image, index = build_crash(scenario)
    size, mode, granularity = scenario[0], scenario[1], scenario[2]
    disk.collapse(reader(image))
    assert disk.read(0, size) == image
    assert disk.pending_sectors() == frozenset() and disk.live_ops() == {}
    assert disk.judge(reader(image)) == []
    # More crash rounds from the recovered state, then plain use at any offset.
    for rng_seed in later_rounds:
        shadow = Shadow(size, mode, granularity)
        shadow.current[:] = image
        shadow.flushed[:] = image
        index = run_ops(disk, shadow, data.draw(st.lists(ops(size, aligned=True), max_size=8)), index)
        index = run_in_flight(
            disk, shadow, data.draw(st.lists(ops(size, aligned=True).filter(lambda o: o.kind != "flush"), max_size=2)), index
        )
        image = shadow.crash_image(random.Random(rng_seed), "random")
        assert disk.judge(reader(image)) == []
        disk.collapse(reader(image))
        assert disk.read(0, size) == image
    plain = bytearray(image)
    for op in data.draw(st.lists(ops(size, aligned=False), max_size=10)):
        apply_plain(plain, op, index, granularity)
        begin(disk, op, index)
        disk.complete(index)
        index += 1
    assert disk.read(0, size) == plain


@given(crash_scenarios())
def test_copy_then_collapse_leaves_the_original_alone(scenario) -> None:
    disk, _, image, _ = build_crash(scenario)
    before = disk.digest()
    touched = disk.touched_sectors()
    current = disk.read(0, len(image))
    clone = disk.copy()
    assert clone.digest() == before
    clone.collapse(reader(image))
    assert disk.digest() == before
    assert disk.touched_sectors() == touched
    assert disk.read(0, len(image)) == current
    assert disk.judge(reader(image)) == []
