"""Crash states: the named choices of which unsynced host operations a crash keeps, tears or cuts, and their images.

A crash state is taken at a crash point p of a `WriteLog` (ops[0:p] happened). Everything
up to the last flush before p is kept (device model rule 1, see `harness.faultfile`);
the state chooses among the ops of the unsynced epoch U (the WRITE and TRUNCATE ops
after that flush and before p; n = len(U)). A state is a plain, printable choice:

    point    the crash point p
    policy   which policy produced it (a label: the image depends only on the fields below)
    kept     log indices of the unsynced ops that survive, applied in log order
    tears    for some kept writes, the kept sectors of that write (the others did not land)
    size     if set, the file is cut back to this many bytes at the end (lost growth)
    garbage  if set, a torn write's sectors that did not land hold garbage from this seed

Its id is one line, for example ``p=17 subsets keep=0,2,5``,
``p=17 torn keep=0-2 tear=2:0-3,5``, ``p=9 truncate keep=4-8 size=196608`` or
``p=9 garbage keep=4-8 tear=6:0 garbage=0``. Index lists print ascending, with runs of
two or more as ``a-b``, and ``none`` for an empty keep list. `CrashState.parse` accepts
exactly this canonical form, so ``parse(s.id) == s`` and ``parse(t).id == t``.

Sectors of a write are its pieces between the host file's absolute 512-byte boundaries
(`harness.faultfile.sector_pieces`): a write at offset 256 of length 1024 has three
sectors, [256, 512), [512, 1024) and [1024, 1280). Write m(w) for that number.

The policies, and exactly how many states each defines at a point
-----------------------------------------------------------------

``drop-unsynced``: keep none of U. The durable image. 1 state.

``prefix``: keep all of U. The file exactly as it was at the crash point. 1 state.

``subsets``: keep any subset of U (rule 2), nothing torn or cut. 2**n states; the
empty and the full subset are the ``drop-unsynced`` and ``prefix`` choices.

``torn``: keep all of U, but tear exactly one write w of U with m(w) >= 2: w keeps a
non-empty proper subset of its sectors (rule 3); the sectors that did not land read as
the bytes before w (zeros past the old end of file), and the file still grows to w's end
(a torn write's growth is kept; losing growth is the ``truncate`` policy).
sum over those w of (2**m(w) - 2) states.

``truncate``: keep all of U, then cut the file back to a size c (rule 4). The candidate
sizes c are, strictly below the size at the crash point: the durable size, the size
after each op of U (so the end of every growth-causing op and every truncate), and for
each op of U that grew the file from a to b, the last 512-byte boundary strictly between
a and b (the growth lost only its last sector). Every candidate is at least the smallest
size the file had since the last flush, so the cut never goes below what the contract
allows. One state per distinct candidate.

``garbage`` (harsh mode, not in `DEFAULT_POLICIES`): the ``torn`` states, with the
sectors that did not land holding seeded garbage instead of the old bytes (rule 6). The
garbage seed is the enumeration seed; it fixes the bytes but is not a dimension of the
space, so the count equals the ``torn`` count.

Counts are exact Python ints (``2**n`` for 40 unsynced writes, ``2**128 - 2`` for one
torn 64 KiB write) and do not depend on how many states are enumerated.

Enumeration and sampling
------------------------

`enumerate_states` lists a policy's whole space when it holds at most
``max(2**k, samples)`` states (so ``subsets`` is exhaustive up to k unsynced ops).
Above that it returns exactly `samples` distinct states, drawn by a `random.Random`
seeded from (seed, point, policy), so a seed reproduces the list:

- ``subsets``: always the none-kept and the all-kept extremes first, then in turn an
  omit-one state, a keep-only-one state and a uniformly random subset.
- ``torn``/``garbage``: in turn a prefix tear (the write stopped after j sectors), a
  suffix tear (only its last sectors landed) and a random non-empty proper subset, each
  of a write chosen in turn or at random. Both policies draw the same tears for a seed.
- ``truncate``: always the smallest and the largest candidate, then random candidates.

Exhaustive lists come in a fixed order: subsets by size and then lexicographically,
tears by write and then likewise, truncations by ascending size.

Deduplication
-------------

States are compared as *choices* (point, kept, tears, size, garbage), never as images.
Within one policy every listed state is a distinct choice. Across policies the only
coinciding choices are ``drop-unsynced`` and ``prefix`` with the empty and full
``subsets`` choice (and with each other when n == 0, where every keep-policy collapses to
the one durable image); ``torn``, ``garbage`` and ``truncate`` choices are disjoint from
everything else by definition. `count_states` counts each policy's own space honestly,
duplicates included; `enumerate_point` and `space_report`'s distinct totals drop the
duplicates. Different choices can still give byte-identical images (a kept write that a
later kept write fully overwrites; a tear whose sectors a later write covers; the same
image at neighbouring points): image-level dedup is left to the runner, which hashes
images anyway.
"""

from __future__ import annotations

import enum
import itertools
import random
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from harness.faultfile import HostOp, HostOpKind, WriteLog, sector_count, sector_pieces
from models.blockio import SECTOR, MemoryFile

__all__ = [
    "Policy",
    "DEFAULT_POLICIES",
    "CrashState",
    "count_states",
    "enumerate_states",
    "enumerate_point",
    "truncate_candidates",
    "CrashImageBuilder",
    "PolicySpace",
    "SpaceReport",
    "space_report",
]


class Policy(enum.StrEnum):
    """A family of crash states at a point; the module docstring defines each one and its count."""

    DROP_UNSYNCED = "drop-unsynced"
    PREFIX = "prefix"
    SUBSETS = "subsets"
    TORN = "torn"
    TRUNCATE = "truncate"
    GARBAGE = "garbage"

    def __repr__(self) -> str:
        # Valid Python, so an operation's repr (Crash(policy=Policy.TORN)) is a runnable program.
        return f"Policy.{self.name}"


DEFAULT_POLICIES: tuple[Policy, ...] = (
    Policy.DROP_UNSYNCED,
    Policy.PREFIX,
    Policy.SUBSETS,
    Policy.TORN,
    Policy.TRUNCATE,
)
"""Every policy except harsh-mode ``garbage``, which a run must ask for."""

Tears = tuple[tuple[int, tuple[int, ...]], ...]


# --------------------------------------------------------------------------- state and id


def range_runs(values: Sequence[int]) -> list[str]:
    """Ascending distinct ints as their runs: [0, 1, 2, 3, 5, 7, 8] -> ['0-3', '5', '7-8']."""
    parts = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return parts


def _format_ranges(values: Sequence[int]) -> str:
    """Ascending distinct ints as ``0-3,5,7-8`` (the form crash-state ids use)."""
    return ",".join(range_runs(values))


def _is_ascending(values: Sequence[int]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) and all(
        a < b for a, b in zip(values, values[1:])
    )


@dataclass(frozen=True, slots=True)
class CrashState:
    """One crash choice at a point of a write log; see the module docstring for the fields and the id syntax.

    `kept` holds ascending log indices; `tears` holds (op index, ascending kept sector
    indices) pairs, ascending by op, each op also in `kept`. Sequences are stored as
    tuples; anything else that breaks these rules raises ValueError.
    """

    point: int
    policy: Policy
    kept: tuple[int, ...] = ()
    tears: Tears = ()
    size: int | None = None
    garbage: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "policy", Policy(self.policy))
        except ValueError:
            raise ValueError(
                f"crash state: policy {self.policy!r} is unknown: expected one of {', '.join(Policy)}"
            ) from None
        set_(self, "kept", tuple(self.kept))
        set_(self, "tears", tuple((op, tuple(secs)) for op, secs in self.tears))
        problems = []
        if not _is_ascending([self.point]):
            problems.append(f"point {self.point!r} must be a non-negative int")
        elif self.kept and not (_is_ascending(self.kept) and self.kept[-1] < self.point):
            problems.append(f"kept {self.kept!r} must be distinct ascending op indices below the point {self.point}")
        tear_ops = [op for op, _ in self.tears]
        if not _is_ascending(tear_ops):
            problems.append(f"tears {self.tears!r} must name distinct op indices in ascending order")
        for op, secs in self.tears:
            if op not in self.kept:
                problems.append(f"torn op {op!r} must also be kept (a dropped write has no sectors to tear)")
            if not secs or not _is_ascending(secs):
                problems.append(f"tear of op {op!r}: sectors {secs!r} must be non-empty, distinct and ascending")
        for name in ("size", "garbage"):
            value = getattr(self, name)
            if value is not None and not _is_ascending([value]):
                problems.append(f"{name} {value!r} must be None or a non-negative int")
        if problems:
            raise ValueError(f"crash state p={self.point!r} {self.policy}: " + "; ".join(problems))

    @property
    def id(self) -> str:
        """The canonical printable id; `CrashState.parse` reverses it exactly."""
        parts = [f"p={self.point}", str(self.policy), f"keep={_format_ranges(self.kept) or 'none'}"]
        parts += [f"tear={op}:{_format_ranges(secs)}" for op, secs in self.tears]
        if self.size is not None:
            parts.append(f"size={self.size}")
        if self.garbage is not None:
            parts.append(f"garbage={self.garbage}")
        return " ".join(parts)

    def __str__(self) -> str:
        return self.id

    @property
    def choice(self) -> tuple[int, tuple[int, ...], Tears, int | None, int | None]:
        """What makes the image: the state without its policy label (the key for deduplication)."""
        return (self.point, self.kept, self.tears, self.size, self.garbage)

    def problems(self, log: WriteLog) -> list[str]:
        """Every way this state does not fit `log` (empty if it fits), in the LazyFS `validate()` style."""
        if self.point > len(log):
            return [f"point {self.point} is beyond the log's last point {len(log)}"]
        flush = log.last_flush_before(self.point)
        out = []
        if self.kept and self.kept[0] <= flush:
            out.append(
                f"kept op {self.kept[0]} is not in the unsynced epoch at point {self.point} "
                f"(ops {flush + 1}..{self.point - 1}, after the flush at op {flush})"
            )
        for op_index, secs in self.tears:
            op = log.ops[op_index]
            if op.kind is not HostOpKind.WRITE:
                out.append(f"torn op {op_index} is a {op.kind}, not a write")
                continue
            m = sector_count(op.offset, len(op.data))
            if secs[-1] >= m:
                out.append(f"tear of op {op_index}: sector {secs[-1]} out of range: the write has {m} sectors")
        return out

    @classmethod
    def parse(cls, text: str) -> CrashState:
        """Read a canonical id (see the module docstring); raise ValueError naming the id, the field and the rule."""
        if not isinstance(text, str):
            raise TypeError(f"crash state id must be a str, got {type(text).__name__}")
        p = _IdParser(text)
        tokens = text.split(" ")
        if "" in tokens:
            p.fail("layout", "fields are separated by single spaces, with none leading or trailing")
        if len(tokens) < 3:
            p.fail("layout", "an id has at least 'p=<point> <policy> keep=<ops>'")
        point = p.int_field(tokens[0], "p")
        try:
            policy = Policy(tokens[1])
        except ValueError:
            p.fail("policy", f"{tokens[1]!r} is not one of {', '.join(Policy)}")
        kept = p.ranges(p.value(tokens[2], "keep"), "keep", allow_none=True)
        tears: list[tuple[int, tuple[int, ...]]] = []
        size = garbage = None
        order = ["tear", "size", "garbage"]
        at = 0
        for token in tokens[3:]:
            name = token.partition("=")[0]
            if name not in order[at:]:
                rule = "is repeated or out of order" if name in order else "is unknown"
                p.fail(name, f"{rule}: after keep= come tear=... (any number), then size=, then garbage=")
            at = order.index(name) + (name != "tear")
            if name == "tear":
                op_text, colon, secs_text = p.value(token, "tear").partition(":")
                if not colon:
                    p.fail("tear", f"{token!r} must read tear=<op>:<sectors>, e.g. tear=2:0-3,5")
                tears.append((p.int_text(op_text, "tear"), p.ranges(secs_text, "tear", allow_none=False)))
            elif name == "size":
                size = p.int_field(token, "size")
            else:
                garbage = p.int_field(token, "garbage")
        try:
            return cls(point, policy, kept, tuple(tears), size, garbage)
        except ValueError as e:
            p.fail("state", str(e))


_DECIMAL = re.compile(r"0|[1-9][0-9]*")


class _IdParser:
    """Field readers for `CrashState.parse` that fail with one clear message."""

    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, field: str, rule: str) -> NoReturn:
        raise ValueError(f"crash state id {self.text!r}: field {field!r}: {rule}")

    def value(self, token: str, name: str) -> str:
        prefix = name + "="
        if not token.startswith(prefix):
            self.fail(name, f"expected {prefix}..., got {token!r}")
        return token[len(prefix) :]

    def int_text(self, text: str, name: str) -> int:
        if not _DECIMAL.fullmatch(text):
            self.fail(name, f"{text!r} is not a canonical non-negative decimal integer")
        return int(text)

    def int_field(self, token: str, name: str) -> int:
        return self.int_text(self.value(token, name), name)

    def ranges(self, text: str, name: str, *, allow_none: bool) -> tuple[int, ...]:
        if text == "none" and allow_none:
            return ()
        values: list[int] = []
        for item in text.split(","):
            lo_text, dash, hi_text = item.partition("-")
            lo = self.int_text(lo_text, name)
            hi = self.int_text(hi_text, name) if dash else lo
            if dash and hi <= lo:
                self.fail(name, f"range {item!r} must have its end above its start")
            if values and lo <= values[-1]:
                self.fail(name, f"{item!r} follows {values[-1]}: items must ascend without repeats")
            if values and lo == values[-1] + 1:
                self.fail(name, f"{item!r} follows {values[-1]}: adjacent numbers are written as one range, a-b")
            values.extend(range(lo, hi + 1))
        return tuple(values)


# --------------------------------------------------------------------------- the spaces


def _check_args(log: WriteLog, point: int, policy: Policy | str, k: int, samples: int = 0) -> Policy:
    log.check_point(point)
    for name, value in (("k", k), ("samples", samples)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r}: must be a non-negative int")
    try:
        return Policy(policy)
    except ValueError:
        raise ValueError(f"policy {policy!r} is unknown: expected one of {', '.join(Policy)}") from None


def _tearable(unsynced: Iterable[HostOp]) -> list[tuple[HostOp, int]]:
    """The unsynced writes with at least two sectors, with their sector counts."""
    out = []
    for op in unsynced:
        if op.kind is HostOpKind.WRITE:
            m = sector_count(op.offset, len(op.data))
            if m >= 2:
                out.append((op, m))
    return out


def truncate_candidates(log: WriteLog, point: int) -> list[int]:
    """The ``truncate`` policy's cut sizes at `point`, ascending (see the module docstring)."""
    durable = log.durable_size(point)
    current = log.size_at(point)
    candidates = {durable}
    before = durable
    for op in log.unsynced(point):
        after = op.size_after
        candidates.add(after)
        last_boundary = (after - 1) // SECTOR * SECTOR
        if after > before and last_boundary > before:
            candidates.add(last_boundary)
        before = after
    return sorted(c for c in candidates if c < current)


def count_states(log: WriteLog, point: int, policy: Policy | str, *, k: int = 8) -> int:
    """The exact number of states `policy` defines at `point` (independent of k, which only bounds enumeration)."""
    policy = _check_args(log, point, policy, k)
    if policy in (Policy.DROP_UNSYNCED, Policy.PREFIX):
        return 1
    if policy is Policy.SUBSETS:
        return 2 ** len(log.unsynced(point))
    if policy is Policy.TRUNCATE:
        return len(truncate_candidates(log, point))
    return sum(2**m - 2 for _, m in _tearable(log.unsynced(point)))


def _budget(k: int, samples: int) -> int:
    return max(2**k, samples)


def _enumerated_count(count: int, k: int, samples: int) -> int:
    """How many states `enumerate_states` returns for a space of `count` states."""
    return count if count <= _budget(k, samples) else samples


def enumerate_states(
    log: WriteLog, point: int, policy: Policy | str, *, k: int = 8, seed: int = 0, samples: int = 64
) -> list[CrashState]:
    """All of `policy`'s states at `point` if there are at most max(2**k, samples); else `samples` seeded distinct ones."""
    policy = _check_args(log, point, policy, k, samples)
    count = count_states(log, point, policy, k=k)
    unsynced = log.unsynced(point)
    everything = tuple(op.index for op in unsynced)
    garbage = seed if policy is Policy.GARBAGE else None

    def state(kept: tuple[int, ...], tears: Tears = (), size: int | None = None) -> CrashState:
        return CrashState(point, policy, kept, tears, size, garbage)

    if policy is Policy.DROP_UNSYNCED:
        return [state(())]
    if policy is Policy.PREFIX:
        return [state(everything)]
    if policy is Policy.TRUNCATE:
        sizes = truncate_candidates(log, point)
        if count > _budget(k, samples):
            rng = random.Random(f"qcrash:{seed}:{point}:{policy}")
            middle = rng.sample(sizes[1:-1], samples - 2) if samples > 2 else []
            sizes = sorted(({sizes[0], sizes[-1]} | set(middle)) if samples >= 2 else set(sizes[:samples]))
        return [state(everything, size=c) for c in sizes]

    if policy is Policy.SUBSETS:

        def every() -> Iterator[CrashState]:
            for r in range(len(everything) + 1):
                for kept in itertools.combinations(everything, r):
                    yield state(kept)

        def drawn(rng: random.Random) -> Iterator[CrashState]:
            yield state(())
            yield state(everything)
            n = len(everything)
            omit = _shuffled_cycle(rng, everything)
            only = _shuffled_cycle(rng, everything)
            while True:
                left_out = next(omit)
                yield state(tuple(i for i in everything if i != left_out))
                yield state((next(only),))
                bits = rng.getrandbits(n)
                yield state(tuple(i for j, i in enumerate(everything) if bits >> j & 1))

    else:  # TORN, GARBAGE
        writes = _tearable(unsynced)

        def torn(op: HostOp, secs: Iterable[int]) -> CrashState:
            return state(everything, ((op.index, tuple(secs)),))

        def every() -> Iterator[CrashState]:
            for op, m in writes:
                for r in range(1, m):
                    for secs in itertools.combinations(range(m), r):
                        yield torn(op, secs)

        def drawn(rng: random.Random) -> Iterator[CrashState]:
            in_turn = _shuffled_cycle(rng, writes)
            while True:
                op, m = next(in_turn)
                yield torn(op, range(rng.randint(1, m - 1)))  # prefix tear: stopped after j sectors
                op, m = next(in_turn)
                yield torn(op, range(rng.randint(1, m - 1), m))  # suffix tear: only the tail landed
                op, m = rng.choice(writes)
                bits = 0
                while bits == 0 or bits == (1 << m) - 1:
                    bits = rng.getrandbits(m)
                yield torn(op, (j for j in range(m) if bits >> j & 1))

    if count <= _budget(k, samples):
        return list(every())
    # Tears share one stream so that torn and garbage draw the same tears for a seed.
    stream = "tears" if policy in (Policy.TORN, Policy.GARBAGE) else str(policy)
    return _distinct(drawn(random.Random(f"qcrash:{seed}:{point}:{stream}")), every, samples)


def _shuffled_cycle(rng: random.Random, items: Sequence):
    """Yield `items` forever, each pass in a fresh seeded random order."""
    items = list(items)
    while True:
        rng.shuffle(items)
        yield from items


def _distinct(draws: Iterator[CrashState], every: Callable[[], Iterator[CrashState]], samples: int) -> list[CrashState]:
    """The first `samples` distinct draws; if draws keep repeating, fill up from the exhaustive order.

    Only called when the space holds more than `samples` states, so the fill always completes.
    """
    seen: dict[tuple, CrashState] = {}
    for _ in range(20 * samples + 100):
        if len(seen) >= samples:
            break
        s = next(draws)
        seen.setdefault(s.choice, s)
    for s in every():
        if len(seen) >= samples:
            break
        seen.setdefault(s.choice, s)
    return list(seen.values())


def enumerate_point(
    log: WriteLog,
    point: int,
    policies: Iterable[Policy | str] = DEFAULT_POLICIES,
    *,
    k: int = 8,
    seed: int = 0,
    samples: int = 64,
) -> list[CrashState]:
    """The states of all `policies` at `point`, each choice once, under the first policy that produced it."""
    seen: dict[tuple, CrashState] = {}
    for policy in policies:
        for s in enumerate_states(log, point, policy, k=k, seed=seed, samples=samples):
            seen.setdefault(s.choice, s)
    return list(seen.values())


# --------------------------------------------------------------------------- images


def _resize(image: bytearray, size: int) -> None:
    if size < len(image):
        del image[size:]
    elif size > len(image):
        image.extend(bytes(size - len(image)))


def _garbage_bytes(seed: int, op_index: int, length: int) -> bytes:
    return random.Random(f"qcrash-garbage:{seed}:{op_index}").randbytes(length)


def _apply(image: bytearray, op: HostOp, sectors: tuple[int, ...] | None = None, garbage: int | None = None) -> None:
    """Apply one op to `image`; for a torn write, only `sectors` land (the rest keep old bytes, or garbage)."""
    if op.kind is HostOpKind.TRUNCATE:
        _resize(image, op.offset)
        return
    if op.kind is not HostOpKind.WRITE or not op.data:
        return
    start, end = op.offset, op.offset + len(op.data)
    if end > len(image):
        _resize(image, end)
    if sectors is None:
        image[start:end] = op.data
        return
    data = memoryview(op.data)
    if garbage is not None:
        data_for_dropped = memoryview(_garbage_bytes(garbage, op.index, len(op.data)))
        keep = set(sectors)
        for j, (lo, hi) in enumerate(sector_pieces(start, len(op.data))):
            image[lo:hi] = (data if j in keep else data_for_dropped)[lo - start : hi - start]
        return
    pieces = sector_pieces(start, len(op.data))
    for j in sectors:
        lo, hi = pieces[j]
        image[lo:hi] = data[lo - start : hi - start]


class CrashImageBuilder:
    """Builds crash images from a `WriteLog`, caching the durable image at the most recent flush asked for.

    A build copies the cached durable image and applies the state's kept ops: O(image
    size + kept bytes). Asking for points in increasing order only ever moves the cache
    forward (each op is applied to it once); asking for an earlier flush epoch replays
    the log from its base, which is correct but slower.
    """

    def __init__(self, log: WriteLog) -> None:
        self.log = log
        self._durable = bytearray(log.base)
        self._applied = 0  # ops[0:_applied] are applied to _durable

    def durable_image(self, point: int) -> bytes:
        """The image every crash state at `point` starts from: all ops up to the last flush before it."""
        return bytes(self._advance(point))

    def _advance(self, point: int) -> bytearray:
        self.log.check_point(point)
        target = self.log.last_flush_before(point) + 1
        if self._applied > target:
            self._durable = bytearray(self.log.base)
            self._applied = 0
        for op in self.log.ops[self._applied : target]:
            _apply(self._durable, op)
        self._applied = target
        return self._durable

    def build(self, state: CrashState, out: bytearray | None = None) -> bytearray:
        """The crash image of `state`; pass `out` to reuse a buffer (it is overwritten and returned).

        Raises ValueError listing every way the state does not fit the log.
        """
        problems = state.problems(self.log)
        if problems:
            raise ValueError(f"crash state {state.id!r} does not fit this log: " + "; ".join(problems))
        durable = self._advance(state.point)
        if out is None:
            image = bytearray(durable)
        else:
            out[:] = durable
            image = out
        tears = dict(state.tears)
        for index in state.kept:
            _apply(image, self.log.ops[index], tears.get(index), state.garbage)
        if state.size is not None and state.size < len(image):
            del image[state.size :]
        return image

    def build_file(self, state: CrashState) -> MemoryFile:
        """The crash image as a `MemoryFile` named after the state (without a second copy of the image)."""
        f = MemoryFile(name=f"crash[{state.id}]")
        f.buf = self.build(state)
        return f


# --------------------------------------------------------------------------- coverage


@dataclass(frozen=True, slots=True)
class PolicySpace:
    """One policy's crash space summed over every point of a log, and how much of it enumeration lists."""

    policy: Policy
    total: int
    enumerated: int

    @property
    def fraction(self) -> float:
        return self.enumerated / self.total if self.total else 1.0


@dataclass(frozen=True, slots=True)
class SpaceReport:
    """Per-policy crash-space sizes over all points of a log, plus the distinct totals across policies."""

    points: int
    k: int
    samples: int
    rows: tuple[PolicySpace, ...]
    distinct_total: int
    distinct_enumerated: int

    @property
    def fraction(self) -> float:
        return self.distinct_enumerated / self.distinct_total if self.distinct_total else 1.0

    def format(self) -> str:
        def line(name: str, total: int, enumerated: int, fraction: float) -> str:
            shown = str(total) if total < 10**12 else f"{float(total):.3e}"
            return f"{name:<16} {shown:>12} {enumerated:>10} {fraction:>10.3g}"

        out = [f"crash space over {self.points} points (k={self.k}, samples={self.samples})"]
        out.append(f"{'policy':<16} {'states':>12} {'enumerated':>10} {'fraction':>10}")
        out += [line(str(r.policy), r.total, r.enumerated, r.fraction) for r in self.rows]
        out.append(line("distinct", self.distinct_total, self.distinct_enumerated, self.fraction))
        return "\n".join(out)

    def as_dict(self) -> dict:
        return {
            "points": self.points,
            "k": self.k,
            "samples": self.samples,
            "policies": {
                str(r.policy): {"states": r.total, "enumerated": r.enumerated, "fraction": r.fraction}
                for r in self.rows
            },
            "distinct": {
                "states": self.distinct_total,
                "enumerated": self.distinct_enumerated,
                "fraction": self.fraction,
            },
        }


def _keep_duplicates(present: set[Policy], n: int, subsets_extremes: Sequence[str]) -> int:
    """How many listed choices at a point repeat one another (see Deduplication).

    Only the empty and the full keep set can coincide across policies: drop-unsynced
    lists the empty one, prefix the full one, subsets the `subsets_extremes` it lists;
    with no unsynced ops (n == 0) the two are the same choice.
    """
    symbol = {"none": "none", "all": "none" if n == 0 else "all"}
    listings = []
    if Policy.DROP_UNSYNCED in present:
        listings.append({symbol["none"]})
    if Policy.PREFIX in present:
        listings.append({symbol["all"]})
    if Policy.SUBSETS in present:
        listings.append({symbol[s] for s in subsets_extremes})
    return sum(map(len, listings)) - len(set().union(*listings))


def space_report(
    log: WriteLog, policies: Iterable[Policy | str] = DEFAULT_POLICIES, k: int = 8, *, seed: int = 0, samples: int = 64
) -> SpaceReport:
    """Sum each policy's `count_states` and `enumerate_states` length over every point of `log`.

    The enumerated numbers are what `enumerate_states(..., k=k, seed=seed, samples=samples)`
    returns (without building the lists); the distinct totals drop the choices that
    several policies share, as `enumerate_point` does.
    """
    policies = list(dict.fromkeys(Policy(p) for p in policies))
    present = set(policies)
    totals = dict.fromkeys(policies, 0)
    listed = dict.fromkeys(policies, 0)
    dup_total = dup_listed = 0
    for point in range(len(log) + 1):
        n = len(log.unsynced(point))
        for policy in policies:
            count = count_states(log, point, policy, k=k)
            totals[policy] += count
            listed[policy] += _enumerated_count(count, k, samples)
        # Sampled subsets lists the extremes first, so it holds as many of them as fit in `samples`.
        sampled = 2**n > _budget(k, samples)
        dup_total += _keep_duplicates(present, n, ("none", "all"))
        dup_listed += _keep_duplicates(present, n, ("none", "all")[: samples if sampled else 2])
    rows = tuple(PolicySpace(p, totals[p], listed[p]) for p in policies)
    return SpaceReport(
        points=len(log) + 1,
        k=k,
        samples=samples,
        rows=rows,
        distinct_total=sum(totals.values()) - dup_total,
        distinct_enumerated=sum(listed.values()) - dup_listed,
    )
