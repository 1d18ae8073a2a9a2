"""What the reference model answers about a crash: the values a sector may hold, the verdict on one it may not, and the model's errors."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

from models.payload import SectorOrigin


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
