"""What a run explored: operations, crash states by policy and write site, recovery situations reached, time per phase."""

from __future__ import annotations

import dataclasses
from collections import Counter


@dataclasses.dataclass
class Stats:
    """Counters of one run (or, merged, of many); the behaviour digest covers all but the timings."""

    ops: int = 0
    crash_states: int = 0
    by_policy: Counter = dataclasses.field(default_factory=Counter)
    by_site: Counter = dataclasses.field(default_factory=Counter)
    coverage: Counter = dataclasses.field(default_factory=Counter)
    phase_seconds: Counter = dataclasses.field(default_factory=Counter)
    # Structural events reached ("<event>") and crashed inside ("<event> crashed"), keyed per
    # configuration class (harness.coverage). Not in the behaviour digest: adding events leaves it alone.
    events: Counter = dataclasses.field(default_factory=Counter)
    # Crash states of recoveries judged (a deep state crashes its own recovery at sampled
    # points, Budget.recovery_points): work per crash state, not crash states. Not in the digest.
    recovery_crash_states: int = 0

    def merge(self, other: "Stats") -> None:
        self.ops += other.ops
        self.crash_states += other.crash_states
        self.recovery_crash_states += other.recovery_crash_states
        for name in ("by_policy", "by_site", "coverage", "phase_seconds", "events"):
            getattr(self, name).update(getattr(other, name))

    def to_dict(self) -> dict:
        return {"ops": self.ops, "crash_states": self.crash_states, "by_policy": dict(self.by_policy),
                "by_site": dict(self.by_site), "coverage": dict(self.coverage),
                "phase_seconds": {k: round(v, 3) for k, v in self.phase_seconds.items()},
                "events": dict(self.events), "recovery_crash_states": self.recovery_crash_states}

    @classmethod
    def from_dict(cls, data: dict) -> "Stats":
        """The inverse of `to_dict` (timings as rounded there); a dict without `events` gives none."""
        return cls(data.get("ops", 0), data.get("crash_states", 0),
                   *(Counter(data.get(name, {})) for name in ("by_policy", "by_site", "coverage", "phase_seconds",
                                                              "events")), data.get("recovery_crash_states", 0))
