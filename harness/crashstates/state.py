"""A crash state, its policy and its canonical printable id (the package docstring defines them)."""

from __future__ import annotations

import enum
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from harness.faultfile import HostOpKind, WriteLog, sector_count

class Policy(enum.StrEnum):
    """A family of crash states at a point; the package docstring defines each one and its count."""

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
    """Non-negative ints (not bools), strictly ascending."""
    if not values:
        return True
    if set(map(type, values)) <= _PLAIN_INT:  # the common case, tested in C (a sweep makes 10^5 states)
        return values[0] >= 0 and all(map(operator.lt, values, values[1:]))
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values) and all(
        a < b for a, b in zip(values, values[1:])
    )


_PLAIN_INT = frozenset({int})


@dataclass(frozen=True, slots=True)
class CrashState:
    """One crash choice at a point of a write log; see the package docstring for the fields and the id syntax.

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

    @classmethod
    def trusted(cls, point: int, policy: Policy, kept: tuple[int, ...], tears: Tears = (), size: int | None = None,
                garbage: int | None = None) -> "CrashState":
        """A state whose fields already keep the rules above, as tuples and a Policy: built without checking them.

        For `enumerate_states` only, whose states hold them by construction (combinations of
        ascending indices); it makes some 10^5 per sweep, and checking each was 2% of a dev
        run. tests/golden and tests/harness/test_points.py re-check every state it makes.
        """
        state = object.__new__(cls)
        set_ = object.__setattr__
        set_(state, "point", point)
        set_(state, "policy", policy)
        set_(state, "kept", kept)
        set_(state, "tears", tears)
        set_(state, "size", size)
        set_(state, "garbage", garbage)
        return state

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
        """Read a canonical id (see the package docstring); raise ValueError naming the id, the field and the rule."""
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
