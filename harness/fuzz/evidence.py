"""What a finding file keeps beside its JSON for the person who fixes the bug: the crash image, the host-op log, the crash in words."""

from __future__ import annotations

import dataclasses

from harness.crashstates import CrashState, range_runs
from harness.faultfile import HostOp, HostOpKind, WriteLog, sector_count

# Readable names of the write sites (models.blockio.WriteSite values).
SITE_WORDS = {
    "header": "header write", "dirty-bit": "dirty-bit write", "reftable-switch": "refcount-table switch",
    "l1": "L1 entry write", "l2": "L2 table write", "l2-alloc": "new L2 table write", "refblock": "refcount block write",
    "refblock-alloc": "new refcount block write", "reftable": "refcount-table entry write",
    "reftable-grow": "new refcount table write", "data": "guest data write", "repair": "repair write",
    "create": "image creation write", "other": "write",
}


@dataclasses.dataclass
class Evidence:
    """The crash image (or the live image of a finding without a crash), its host-op log as text, and the crash in words."""

    image: bytes | None
    oplog: str
    words: str | None


def gather(rep) -> Evidence:
    """Replay a reproducer (its injected bugs already switched on by the caller) and keep what the finding saw."""
    from harness.runner import Runner
    from harness.targets.qemu.spec import make, release, spec_of

    if rep.errors is not None:
        return _error_evidence(rep)
    runner = Runner(rep.config, seed=rep.seed, budget=rep.budget, target=make(spec_of(rep.target, rep.qemu)))
    try:
        findings = runner.run(rep.ops)
        return _evidence(runner, findings)
    finally:
        release(getattr(runner, "target", None))


def _error_evidence(rep) -> Evidence:
    """An error-point finding has no crash state to keep: the failed host operation in words, and a replay check."""
    from harness.errorpoints import replay

    words = f"host {rep.errors.point.op} #{rep.errors.point.ordinal} fails with {rep.errors.point.kind} ({rep.errors.variant})"
    if replay(rep.config, rep.ops, rep.errors) is None:
        return Evidence(None, "(the reproducer did not fail when its evidence was gathered)\n", None)
    return Evidence(None, f"(error point {rep.errors.point}: no crash-state log)\n", words)


def _evidence(runner, findings) -> Evidence:
    if not findings:
        return Evidence(None, "(the reproducer did not fail when its evidence was gathered)\n", None)
    finding = findings[0]
    log = runner.ff.log
    if finding.crash_id is None:
        words = f"no crash: {finding.phase} of operation #{finding.op_index} ({finding.op_kind})"
        return Evidence(runner.target.contents(), format_log(log, None), words)
    state = CrashState.parse(finding.crash_id)
    return Evidence(bytes(runner.executor.builder.build(state)), format_log(log, state), describe(state, log))


def _op_words(op: HostOp) -> str:
    if op.kind is HostOpKind.WRITE:
        return f"{SITE_WORDS.get(str(op.site), str(op.site))} at {op.offset:#x}"
    if op.kind is HostOpKind.TRUNCATE:
        return f"truncate to {op.offset:#x}"
    return "flush"


def _ranges(values: list[int]) -> str:
    """[6, 7, 8, 10] -> '6-8 and 10'."""
    runs = range_runs(values)
    return runs[0] if len(runs) == 1 else ", ".join(runs[:-1]) + " and " + runs[-1]


def fates(state: CrashState, log: WriteLog) -> dict[int, str]:
    """Each host op's fate in this crash state: kept (synced), kept, lost, torn (...), or not reached."""
    flushed = log.last_flush_before(state.point)
    kept = set(state.kept)
    tears = dict(state.tears)
    out = {}
    for op in log.ops:
        if op.index >= state.point:
            out[op.index] = "not reached"
        elif op.index <= flushed or op.kind is HostOpKind.FLUSH:
            out[op.index] = "kept (before the last flush)"
        elif op.index in tears:
            n = sector_count(op.offset, len(op.data))
            out[op.index] = f"torn: sectors {_ranges(list(tears[op.index]))} of 0-{n - 1} kept"
        else:
            out[op.index] = "kept" if op.index in kept else "lost"
    return out


def describe(state: CrashState, log: WriteLog) -> str:
    """The crash state in words: 'crash after host op 11 (L2 table write at 0x30000): unsynced writes 6 and 10 kept, 7-9 lost'."""
    if state.point == 0:
        head = "crash before the first host op"
    else:
        head = f"crash after host op {state.point - 1} ({_op_words(log.ops[state.point - 1])})"
    fate = fates(state, log)
    unsynced = [op.index for op in log.unsynced(state.point)]
    if not unsynced:
        return f"{head}: every write before it was flushed, nothing to lose ({state.policy})"
    kept = [i for i in unsynced if fate[i] == "kept"]
    lost = [i for i in unsynced if fate[i] == "lost"]
    torn = [i for i in unsynced if fate[i].startswith("torn")]
    parts = []
    if kept:
        parts.append(f"unsynced {'op' if len(kept) == 1 else 'ops'} {_ranges(kept)} kept")
    if lost:
        parts.append(f"{_ranges(lost)} lost")
    for i in torn:
        parts.append(f"{i} {fate[i]}")
    if state.size is not None:
        parts.append(f"file cut back to {state.size} bytes (growth lost)")
    if state.garbage is not None:
        parts.append("sectors that did not land hold garbage")
    return f"{head}: {', '.join(parts)} ({state.policy})"


def format_log(log: WriteLog, state: CrashState | None) -> str:
    """The host-op log as a table: index, kind, write site, offset, length, and its fate in the crash state."""
    fate = fates(state, log) if state else {}
    lines = [f"# host operations of the image{' and their fate in crash state ' + state.id if state else ''}",
             f"{'index':>6}  {'kind':<8}  {'write site':<16}  {'offset':>12}  {'length':>9}  in this crash state"]
    for op in log.ops:
        site = str(op.site) if op.kind is HostOpKind.WRITE else "-"
        lines.append(f"{op.index:>6}  {op.kind!s:<8}  {site:<16}  {op.offset:>#12x}  {len(op.data):>9}  "
                     f"{fate.get(op.index, '-')}")
    return "\n".join(lines) + "\n"
