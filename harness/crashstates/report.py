"""Coverage of the crash space: each policy's total and enumerated states summed over every point of a log."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness.crashstates.spaces import _budget, _enumerated_count, count_states
from harness.crashstates.state import DEFAULT_POLICIES, Policy
from harness.faultfile import WriteLog

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
