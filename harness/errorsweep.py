"""The error-point sweep: every host read, write, flush and truncate of a seeded workload failed in turn (EIO, ENOSPC, short write), alone or followed by a crash, and judged by the contract's I/O-error rules.

The rules (harness/CRASH-CONTRACT.md, "Hostile images and failing host operations"):

1. **swallowed**: a guest call during which a host operation failed must return an error;
2. **lost**: data acknowledged before the failure (written and then flushed by a guest call
   that succeeded, or written in writethrough mode) reads back after the next open;
   sectors written since the last successful flush, or by a failed call, may hold any
   value written to them since;
3. **corrupt**: the image is consistent for the next open: with the dirty bit clear,
   `check` finds no corruption (leaks allowed); with it set, a read-write open repairs it;
4. **repair**: a repair that meets an error leaves an image the next repair completes.

Two variants per error point: `close` (the workload goes on after the failed call, then
closes: the image must absorb the error) and `crash` (the run stops at the failed call and
only what was flushed survives). The sweep drives `Qcow2Image` over a `FaultInjectingFile`
directly (the Python target); `harness.errorpoints` runs it on fuzz examples (the profile's
`error_examples` share) and turns its verdicts into Findings.
"""

from __future__ import annotations

import dataclasses
import random
import time

from harness.faultfile import ErrorKind, ErrorPlan, ErrorPoint, FaultInjectingFile, HostOpKind
from harness.targets.python import CopyOnWriteFile
from models.blockio import CacheMode, MemoryFile, sector_runs
from models.qcow2 import check as checkmod
from models.qcow2.errors import Qcow2Error
from models.qcow2.image import Qcow2Image

SECTOR = 512


@dataclasses.dataclass(frozen=True)
class Workload:
    cluster_size: int
    lazy: bool
    cache_mode: str
    size: int
    ops: tuple[tuple, ...]  # ("write", offset, length, pattern) | ("flush",) | ("discard", offset, length)
    dirty_base: bool = False  # for the repair sweep: a dirty image left by an aborted lazy writer
    version: int = 3
    refcount_bits: int = 16


@dataclasses.dataclass(frozen=True)
class ErrorFinding:
    rule: str
    point: str
    variant: str
    evidence: str
    workload: Workload
    op_index: int = -1  # the workload op during which the rule broke; len(ops) for close, -1 before the first

    def __str__(self) -> str:
        return f"{self.rule} at {self.point} ({self.variant}): {self.evidence}"


def generate(seed: int) -> Workload:
    rng = random.Random(f"errorsweep:{seed}")
    cs = rng.choice((512, 4096, 65536))
    size = 1 << 20
    ops: list[tuple] = []
    for i in range(rng.randrange(3, 9)):
        roll = rng.random()
        if roll < 0.2:
            ops.append(("flush",))
        elif roll < 0.3:
            off = rng.randrange(size // cs) * cs
            ops.append(("discard", off, cs))
        else:
            off = rng.randrange(size // SECTOR) * SECTOR
            ops.append(("write", off, min(size - off, rng.choice((SECTOR, 4 * SECTOR, cs, 2 * cs))), 1 + i))
    return Workload(cs, rng.random() < 0.6, rng.choice(("writeback", "writethrough")), size, tuple(ops))


def _base_image(w: Workload) -> bytes:
    mem = MemoryFile(name="errorsweep.qcow2")
    Qcow2Image.create(mem, w.size, version=w.version, cluster_size=w.cluster_size, refcount_bits=w.refcount_bits,
                      lazy_refcounts=w.lazy)
    return mem.getvalue()


class _Model:
    """Allowed values per sector: the last committed value, plus anything written since the last successful flush."""

    def __init__(self) -> None:
        self.committed: dict[int, int] = {}
        self.pending: dict[int, set[int]] = {}

    def wrote(self, offset: int, length: int, value: int, *, durable: bool) -> None:
        for s in range(offset // SECTOR, (offset + length) // SECTOR):
            self.pending.setdefault(s, set()).add(value)
            if durable:
                self.committed[s] = value
                self.pending[s] = set()

    def flushed(self) -> None:
        # A successful flush makes every acknowledged write durable; failed writes stay uncertain.
        self.pending = {s: v for s, v in self.pending.items() if v - {self.committed.get(s)}}

    def ack(self, offset: int, length: int, value: int) -> None:
        for s in range(offset // SECTOR, (offset + length) // SECTOR):
            self.committed[s] = value
            self.pending.setdefault(s, set())

    def allowed(self, s: int) -> set[int]:
        return {self.committed.get(s, 0)} | self.pending.get(s, set())

    def sectors(self) -> list[int]:
        return sorted(self.committed.keys() | self.pending.keys())


def _apply(img: Qcow2Image, op: tuple) -> None:
    if op[0] == "write":
        img.write(op[1], bytes([op[3]]) * op[2])
    elif op[0] == "discard":
        img.discard(op[1], op[2])
    else:
        img.flush()


def _durable(f: FaultInjectingFile) -> bytes:
    """The crash image where only what the last completed flush covered survives."""
    log = f.log
    buf = bytearray(log.base)
    for op in log.ops[: log.last_flush_before(len(log)) + 1]:
        if op.kind is HostOpKind.WRITE and op.data:
            end = op.offset + len(op.data)
            if end > len(buf):
                buf.extend(bytes(end - len(buf)))
            buf[op.offset : end] = op.data
        elif op.kind is HostOpKind.TRUNCATE:
            del buf[op.offset :]
            buf.extend(bytes(max(0, op.offset - len(buf))))
    return bytes(buf)


def run_point(w: Workload, point: ErrorPoint | None, variant: str, base: bytes | None = None) -> ErrorFinding | None:
    """One run of the workload with one error point; the first rule broken, or None."""
    base = _base_image(w) if base is None else base
    plan = ErrorPlan((point,) if point else ())
    f = FaultInjectingFile(CopyOnWriteFile(base, name="errorsweep.qcow2"), plan)
    model = _Model()
    writethrough = CacheMode(w.cache_mode).flushes_writes
    where = str(point) if point else "no error"
    at = [-1]  # the op being run, for the finding

    def finding(rule: str, evidence: str) -> ErrorFinding:
        return ErrorFinding(rule, where, variant, evidence, w, at[0])

    try:
        img = Qcow2Image.open(f, cache_mode=w.cache_mode, lazy_refcounts=w.lazy)
    except Qcow2Error:
        return _judge(base if variant == "crash" else f.inner.getvalue(), model, finding)
    # Released however the run ends: the image's reference cycles would keep it, its file and that file's
    # log (every byte the run wrote) until the next collection.
    try:
        failed = False
        swallowed: list[ErrorFinding] = []
        for i, op in enumerate(w.ops):
            at[0] = i
            fired = len(plan.fired)
            try:
                _apply(img, op)
            except Qcow2Error:
                failed = True
                if op[0] == "write":
                    model.wrote(op[1], op[2], op[3], durable=False)
                if variant == "crash":
                    img.abort()
                    return _judge(_durable(f), model, finding)
                continue
            if len(plan.fired) > fired and not swallowed:
                # Judged at the end: what the swallowed error cost (lost data, corruption) is the better evidence.
                swallowed.append(finding("swallowed", f"{op[0]} returned success although {plan.fired[-1]} failed"))
            if op[0] == "write":
                model.wrote(op[1], op[2], op[3], durable=writethrough)
            elif op[0] == "flush":
                model.flushed()
            if op[0] == "discard":
                model.wrote(op[1], op[2], 0, durable=False)
        fired = len(plan.fired)
        at[0] = len(w.ops)
        try:
            img.close()
        except Qcow2Error:
            failed = True
            if variant == "crash":
                return _judge(_durable(f), model, finding) or (swallowed[0] if swallowed else None)
        else:
            if len(plan.fired) > fired and not swallowed:
                swallowed.append(finding("swallowed", f"close returned success although {plan.fired[-1]} failed"))
            if not failed:
                model.flushed()  # a clean close made everything durable
        return _judge(f.inner.getvalue(), model, finding) or (swallowed[0] if swallowed else None)
    finally:
        img.release()


def _judge(raw: bytes, model: _Model, finding) -> ErrorFinding | None:
    mem = CopyOnWriteFile(raw, name="after.qcow2")
    dirty = len(raw) > 80 and raw[79] & 1
    if not dirty:
        result = checkmod.check(CopyOnWriteFile(raw, name="after.qcow2"))
        if result.corruptions or result.check_errors:
            return finding("corrupt", f"dirty bit clear but check finds {result.corruptions} corruptions, "
                                      f"{result.check_errors} check errors: {result.messages[:3]}")
    try:
        repaired = Qcow2Image.open(mem)  # repairs a dirty image
        repaired.close()
        repaired.release()
        img = Qcow2Image.open(mem, readonly=True)
    except Qcow2Error as exc:
        return finding("corrupt", f"the next open fails: {exc}")
    try:
        for s, got in _sectors_read(img, [s for s in model.sectors() if s * SECTOR < img.size]):
            allowed = model.allowed(s)
            if got != bytes([got[0]]) * SECTOR or got[0] not in allowed:
                return finding("lost", f"sector {s} reads {got[:4].hex()}..., allowed {sorted(allowed)}")
        return None
    finally:
        img.release()


_READ_RUN = 2048  # consecutive sectors read at once (1 MiB)


def _sectors_read(img: Qcow2Image, sectors: list[int]):
    """(sector, its 512 bytes) for ascending `sectors`, read by runs of consecutive ones (one read per sector
    made the sweep's checks a fifth of a 2 MiB-cluster example). A run whose read fails is read sector by
    sector, so a sector judged before the failing one is still judged first, and the failure comes from its own sector."""
    for i, j in sector_runs(sectors, _READ_RUN):
        first = sectors[i]
        try:
            data = img.read(first * SECTOR, (j - i) * SECTOR)
        except Exception:  # (re-raised below, from the sector whose read fails)
            data = None
        for k in range(j - i):
            if data is None:
                yield first + k, img.read((first + k) * SECTOR, SECTOR)
            else:
                yield first + k, data[k * SECTOR:(k + 1) * SECTOR]


def error_points(w: Workload, base: bytes) -> list[ErrorPoint]:
    """Every host operation of a clean run, with each way it can fail."""
    plan = ErrorPlan()
    f = FaultInjectingFile(CopyOnWriteFile(base, name="count.qcow2"), plan)
    img = Qcow2Image.open(f, cache_mode=w.cache_mode, lazy_refcounts=w.lazy)
    for op in w.ops:
        _apply(img, op)
    img.close()
    img.release()
    points = []
    for op, n in plan.counts.items():
        kinds = {"write": (ErrorKind.EIO, ErrorKind.SHORT, ErrorKind.ENOSPC), "truncate": (ErrorKind.EIO, ErrorKind.ENOSPC)}
        for i in range(n):
            points += [ErrorPoint(op, i, k) for k in kinds.get(op, (ErrorKind.EIO,))]
    return points


def sweep_workload(w: Workload, variants: tuple[str, ...] = ("close", "crash"), stop_at_first: bool = True) -> list[ErrorFinding]:
    base = _base_image(w)
    found = []
    for point in error_points(w, base):
        for variant in variants:
            f = run_point(w, point, variant, base)
            if f is not None:
                found.append(f)
                if stop_at_first:
                    return found
    return found


def dirty_image(w: Workload) -> bytes:
    """The image a lazy writer of the workload leaves when it aborts after its last flush: dirty, with leaks to repair."""
    mem = MemoryFile(_base_image(dataclasses.replace(w, lazy=True)), name="dirty.qcow2")
    img = Qcow2Image.open(mem, lazy_refcounts=True)
    for op in w.ops:
        _apply(img, op)
    img.flush()
    img.abort()
    return mem.getvalue()


def repair_error_points(dirty: bytes) -> list[ErrorPoint]:
    """Every host operation of a clean repair of `dirty` (each fails with EIO in its run)."""
    plan = ErrorPlan()
    checkmod.repair(FaultInjectingFile(CopyOnWriteFile(dirty, name="count.qcow2"), plan), checkmod.Fix.ALL)
    return [ErrorPoint(op, i) for op, n in plan.counts.items() for i in range(n)]


def repair_point(w: Workload, dirty: bytes, point: ErrorPoint) -> ErrorFinding | None:
    """Repair `dirty` with `point` failing; the next repair must complete (rule 4)."""
    f = FaultInjectingFile(CopyOnWriteFile(dirty, name="repair.qcow2"), ErrorPlan((point,)))
    try:
        checkmod.repair(f, checkmod.Fix.ALL)
    except Qcow2Error:
        pass
    second = CopyOnWriteFile(f.inner.getvalue(), name="repair.qcow2")
    result = checkmod.repair(second, checkmod.Fix.ALL)
    again = checkmod.check(CopyOnWriteFile(second.getvalue(), name="repair.qcow2"))
    if not result.consistent_after_fix or again.corruptions or again.leaks or again.check_errors:
        return ErrorFinding("repair", str(point), "repair", f"the next repair does not complete: "
                            f"{again.corruptions} corruptions, {again.leaks} leaks", w, len(w.ops))
    return None


def repair_points(seed: int) -> list[ErrorFinding]:
    """A dirty image (lazy writer aborted), repaired with each host operation failing in turn; the next repair must complete."""
    w = generate(seed)
    dirty = dirty_image(w)
    found = [repair_point(w, dirty, p) for p in repair_error_points(dirty)]
    return [f for f in found if f is not None]


def hunt(seconds: float, seed: int = 1, *, first_seed: int = 0) -> tuple[ErrorFinding | None, int, float]:
    """Sweep seeded workloads until a finding or the time budget; (finding, workloads swept, seconds)."""
    start = time.perf_counter()
    s = first_seed
    while time.perf_counter() - start < seconds:
        found = sweep_workload(generate(seed * 100003 + s))
        s += 1
        if found:
            return found[0], s - first_seed, time.perf_counter() - start
    return None, s - first_seed, time.perf_counter() - start


def zoo(seconds: float = 60.0, seed: int = 1) -> list[tuple[str, ErrorFinding | None, int, float]]:
    """Time to detection of each error-handling bug (models.qcow2.inject.ERROR_BUGS), one core."""
    from models.qcow2 import inject

    rows = []
    previous = inject.active()
    try:
        for bug in inject.ERROR_BUGS:
            inject.set_active([bug])
            found, swept, took = hunt(seconds, seed)
            rows.append((bug, found, swept, took))
    finally:
        inject.set_active(previous)
    return rows


def main(argv: list[str] | None = None) -> int:
    """`python -m harness.errorsweep [--zoo SECONDS] [--clean SECONDS] [--seed N] [--out DIR]`: a report under reports/."""
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m harness.errorsweep", description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=float, default=60.0, help="seconds per error-handling bug (0: skip)")
    p.add_argument("--clean", type=float, default=60.0, help="seconds of sweeping the correct implementation")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    lines = [f"# Error-point sweep, seed {args.seed}", ""]
    status = 0
    if args.clean > 0:
        found, swept, took = hunt(args.clean, args.seed)
        rep = sum(len(repair_points(args.seed * 7919 + i)) for i in range(3))
        lines += [f"Correct implementation: {swept} workloads swept in {took:.1f}s, "
                  f"finding: {found or 'none'}; repair sweep (3 dirty images): {rep} findings", ""]
        status |= bool(found or rep)
    if args.zoo > 0:
        lines += ["| bug | detected | seconds | workloads | finding |", "|---|---|---|---|---|"]
        for bug, found, swept, took in zoo(args.zoo, args.seed):
            lines.append(f"| {bug} | {'yes' if found else 'no'} | {took:.2f} | {swept} | {found or ''} |")
            status |= found is None
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else Path("reports") / f"errorsweep-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "errorsweep.md").write_text(text)
    print(text + f"report: {out}/errorsweep.md")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
