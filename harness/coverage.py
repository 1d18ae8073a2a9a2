"""Coverage of the crash space: which structural events a guest operation caused, per configuration class, and the report table of reached and crashed-inside events.

An event is *reached* when a guest op causes it (read from the op, the configuration and
the write sites of the host ops the op produced), and *crashed inside* when at least one
crash state was judged at a point of that op (a partial-cluster discard writes nothing to
the host, so it has no points: the report says so instead of showing a gap). Both are counted in `Stats.events` under
"<class>|<event>" and "<class>|<event>|crashed"; the behaviour digest does not read them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from harness.config import Config
from harness.faultfile import HostOp, HostOpKind
from harness.ops import Discard, Op, Reopen, Write, WriteZeroes
from models.blockio import WriteSite

L2_ALLOC = "L2 table allocated"
L2_CROSS = "range crosses an L2 boundary"
REFBLOCK = "new refcount block"
REFTABLE_GROW = "refcount-table growth"
DISK_END = "write at the disk end"
PARTIAL_DISCARD = "discard of a partial cluster"
ZERO_V2 = "zero write in v2"
ZERO_V3 = "zero write in v3"
CACHE_SWITCH = "cache-mode switch while dirty"
LAZY_SWITCH = "lazy-refcounts switch while dirty"

EVENTS = (L2_ALLOC, L2_CROSS, REFBLOCK, REFTABLE_GROW, DISK_END, PARTIAL_DISCARD, ZERO_V2, ZERO_V3,
          CACHE_SWITCH, LAZY_SWITCH)
_SITE_EVENTS = {WriteSite.L2_ALLOC: L2_ALLOC, WriteSite.REFBLOCK_ALLOC: REFBLOCK, WriteSite.REFTABLE_GROW: REFTABLE_GROW}
CRASHED = "|crashed"
OPS = "guest ops"  # counted for every op, so a class whose ops reached no event still shows, all never reached
DIRTY_OFFSET = 72  # the v3 header's incompatible_features (big-endian); bit 0 is the dirty bit


def config_class(config: Config) -> str:
    """The class an event is counted under: format version and cluster-size band."""
    c = config.cluster_size
    band = "512 B-1 KiB" if c <= 1024 else "2-16 KiB" if c <= 16384 else "32 KiB+"
    return f"v{config.version} cluster {band}"


def is_dirty(header: bytes) -> bool:
    """The v3 dirty bit in a host image's first bytes (False for v2 and short images)."""
    if header[4:8] != (3).to_bytes(4, "big") or len(header) < DIRTY_OFFSET + 8:
        return False
    return bool(int.from_bytes(header[DIRTY_OFFSET:DIRTY_OFFSET + 8], "big") & 1)


def is_switch(op: Op) -> bool:
    """A reopen that names a cache mode or a lazy-refcounts setting (whether it changes is decided by the target's options)."""
    return isinstance(op, Reopen) and (op.cache_mode is not None or op.lazy_refcounts is not None)


def events_of(config: Config, op: Op, host_ops: Iterable[HostOp], *, options=None, dirty: bool = False) -> list[str]:
    """The events `op` caused; `options` are the target's open options before a Reopen, `dirty` its dirty bit then."""
    found = {_SITE_EVENTS[h.site] for h in host_ops if h.kind is HostOpKind.WRITE and h.site in _SITE_EVENTS}
    if isinstance(op, (Write, WriteZeroes, Discard)):
        found |= _range_events(config, op)
    if isinstance(op, Reopen) and dirty and options is not None:
        if op.cache_mode is not None and op.cache_mode != str(options.cache_mode):
            found.add(CACHE_SWITCH)
        if op.lazy_refcounts is not None and op.lazy_refcounts != options.lazy_refcounts:
            found.add(LAZY_SWITCH)
    return [e for e in EVENTS if e in found]


def _range_events(config: Config, op: Write | WriteZeroes | Discard) -> set[str]:
    c = config.cluster_size
    end = op.offset + op.length
    l2_cover = c * (c // 8)
    found = set()
    if op.offset // l2_cover != (end - 1) // l2_cover:
        found.add(L2_CROSS)
    if isinstance(op, (Write, WriteZeroes)) and end == config.virtual_size:
        found.add(DISK_END)
    if isinstance(op, Discard) and (op.offset % c or (end % c and end != config.virtual_size)):
        found.add(PARTIAL_DISCARD)
    if isinstance(op, WriteZeroes):
        found.add(ZERO_V2 if config.version == 2 else ZERO_V3)
    return found


def count(events: Counter, cls: str, names: Iterable[str], *, crashed: bool = False) -> None:
    for name in names:
        events[f"{cls}|{name}{CRASHED if crashed else ''}"] += 1


def table(events: dict[str, int]) -> dict[str, dict[str, dict[str, int]]]:
    """{class: {event: {"reached": n, "crashed": m}}} for every class that ran, every event listed (0 = never reached)."""
    classes = sorted({key.split("|", 1)[0] for key in events})
    return {cls: {e: {"reached": events.get(f"{cls}|{e}", 0), "crashed": events.get(f"{cls}|{e}{CRASHED}", 0)}
                  for e in EVENTS if applies(cls, e)} for cls in classes}


def applies(cls: str, event: str) -> bool:
    """v2 images have no lazy refcounts and no dirty bit (so no switch while dirty), and their zero writes
    are v2 ones; v3 zero writes are v3 ones."""
    if cls.startswith("v2"):
        return event not in (ZERO_V3, LAZY_SWITCH, CACHE_SWITCH)
    return event != ZERO_V2


# Events that write nothing to the host by construction, so no crash state lies inside them.
# (QEMU's qcow2 discard drops a request's partial head and tail clusters before they reach the image.)
WRITELESS = {PARTIAL_DISCARD: "a discard drops its partial clusters, nothing to crash"}


def overall(rows: dict[str, dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """Every event summed over the classes it applies to: {event: {"reached": n, "crashed": m}}."""
    out = {e: {"reached": 0, "crashed": 0} for e in EVENTS}
    for events in rows.values():
        for name, n in events.items():
            out[name]["reached"] += n["reached"]
            out[name]["crashed"] += n["crashed"]
    return out


def reach_note(cls: str, event: str) -> str:
    """Why a never-reached refcount edge is far for this class: the host file it takes at the class's
    nearest geometry (its smallest clusters, the widest refcounts its version allows)."""
    if event not in (REFBLOCK, REFTABLE_GROW) or "cluster " not in cls:
        return ""
    cs = {"512 B-1 KiB": 512, "2-16 KiB": 2048, "32 KiB+": 32768}[cls.split("cluster ", 1)[1]]
    bits = 64 if cls.startswith("v3") else 16
    host = cs * cs * 8 // bits if event == REFBLOCK else cs ** 3 // bits
    return f"; needs a host file over {_size(host)} even at {_size(cs)} clusters, {bits}-bit refcounts"


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _cells(cls: str, name: str, n: dict[str, int]) -> tuple[str, str]:
    reached = f"{n['reached']}" if n["reached"] else f"0 **(never reached{reach_note(cls, name)})**"
    if name in WRITELESS and n["reached"]:
        crashed = (f"{n['crashed']} (whole clusters the same discards covered)" if n["crashed"]
                   else f"0 (reached; no host writes by construction: {WRITELESS[name]})")
    else:
        crashed = f"{n['crashed']}" if n["crashed"] or not n["reached"] else "0 **(never crashed inside)**"
    return reached, crashed


def markdown(rows: dict[str, dict[str, dict[str, int]]]) -> list[str]:
    """The report section: every event over all classes, then one table per configuration class,
    never-reached and never-crashed events marked, events with no host writes by construction said so."""
    lines = ["## Structural events reached and crashed inside", ""]
    if not rows:
        return lines + ["No guest operations ran.", ""]
    head = ["| event | ops that caused it | crashed inside |", "|---|---|---|"]
    lines += ["### all classes", "", *head]
    for name, n in overall(rows).items():
        reached, crashed = _cells("all", name, n)
        lines.append(f"| {name} | {reached} | {crashed} |")
    lines.append("")
    for cls, events in rows.items():
        lines += [f"### {cls}", "", *head]
        for name, n in events.items():
            reached, crashed = _cells(cls, name, n)
            lines.append(f"| {name} | {reached} | {crashed} |")
        lines.append("")
    return lines
