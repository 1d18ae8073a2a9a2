"""The one registry of run profiles (dev, ci, nightly): sequence length, crash budgets, shrink time and Hypothesis settings."""

from __future__ import annotations

import dataclasses
import os
import shutil
from types import MappingProxyType
from typing import Mapping

from harness.errors import QcrashError
from harness.runner import Budget


class ProfileError(QcrashError):
    """An unknown profile name; the message names where it came from and the known names."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """How deep one profile goes, for `qcrash fuzz` and for the Hypothesis state machine alike."""

    name: str
    ops: tuple[int, int]  # guest operations per generated example (inclusive range)
    budget: Budget  # crash-state budget per fuzz example
    shrink_seconds: float  # time to shrink one fuzz finding
    machine_budget: Budget  # crash-state budget per Hypothesis state-machine example
    # Hypothesis settings besides the database (chosen at registration, see hypothesis_database).
    hypothesis: Mapping[str, object]
    keeps_database: bool  # False: no example database at all (ci: reproducible from the seed alone)
    # The Hypothesis profile this one derives from, named explicitly: `nightly` must never
    # silently inherit `ci`'s derandomization.
    hypothesis_parent: str = "default"
    # Fraction of fuzz examples (seeded per example) whose error points are swept too (harness.errorpoints):
    # 0 keeps a profile's runs exactly as they were before error points joined the fuzz flow.
    error_examples: float = 0.0
    # Fraction of fuzz examples (seeded per example, from a stream of their own) whose configuration
    # takes the geometry with the nearest refcount edges (harness.generate.edge_geometry): few drawn
    # configurations let one sequence grow the refcount table, and this makes the growth reliable.
    edge_examples: float = 0.0


_SUPPRESS = ("too_slow", "data_too_large")  # HealthCheck names: long stateful examples are the point

PROFILES: Mapping[str, Profile] = MappingProxyType({p.name: p for p in (
    Profile(
        name="dev",
        ops=(3, 12),
        budget=Budget(),
        shrink_seconds=20.0,
        machine_budget=Budget(samples=2, states_per_op=4, recovery_every=8),
        hypothesis=MappingProxyType({"max_examples": 50, "deadline": None}),
        keeps_database=True,
    ),
    Profile(
        name="ci",
        ops=(3, 10),
        budget=Budget(samples=3, states_per_op=8, recovery_every=6),
        shrink_seconds=10.0,
        machine_budget=Budget(samples=2, states_per_op=4, recovery_every=8),
        hypothesis=MappingProxyType({"max_examples": 60, "deadline": None, "derandomize": True, "print_blob": True}),
        keeps_database=False,
    ),
    # Nightly sweeps every point of every op under every policy (sampled inside a policy whose
    # space is larger than 2**k, and past 512 states an op) and asks real qemu-img check about
    # a sample of raw crash images when it is installed.
    Profile(
        name="nightly",
        ops=(4, 24),
        budget=Budget(samples=16, states_per_op=512, recovery_points=4, recovery_every=2,
                      qemu_every=50 if shutil.which("qemu-img") else 0),
        shrink_seconds=60.0,
        machine_budget=Budget.exhaustive(),
        hypothesis=MappingProxyType({"max_examples": 2000, "deadline": None}),
        keeps_database=True,
        error_examples=0.25,
        edge_examples=0.08,
    ),
)})

NAMES: tuple[str, ...] = tuple(PROFILES)


def get(name: str, where: str = "profile") -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(f"{where} = {name!r}: unknown profile; known: {', '.join(NAMES)}") from None


def in_ci(environ: Mapping[str, str] = os.environ) -> bool:
    """The CI convention: CI=true (or 1, yes) in the environment."""
    return environ.get("CI", "").lower() in ("1", "true", "yes")


def default_name(environ: Mapping[str, str] = os.environ) -> str:
    """The profile `qcrash fuzz` uses when none is given: `ci` under CI, else `dev`."""
    return "ci" if in_ci(environ) else "dev"


def current(environ: Mapping[str, str] = os.environ) -> Profile:
    """The profile of the test session (Hypothesis and its state machine): QCRASH_PROFILE, else the default.

    Read at call time, never at import time, so a test or a command can set the environment first.
    """
    return get(environ.get("QCRASH_PROFILE") or default_name(environ), "QCRASH_PROFILE")


# ------------------------------------------------------------------------- Hypothesis


def hypothesis_database(environ: Mapping[str, str] = os.environ):
    """The example database: QCRASH_HYPOTHESIS_DB (default .hypothesis/examples), plus, when
    QCRASH_SHARED_DB names one, a shared database of known failures that shards read but never write."""
    from hypothesis.database import DirectoryBasedExampleDatabase, MultiplexedDatabase, ReadOnlyDatabase

    own = DirectoryBasedExampleDatabase(environ.get("QCRASH_HYPOTHESIS_DB", ".hypothesis/examples"))
    shared = environ.get("QCRASH_SHARED_DB")
    if shared:
        return MultiplexedDatabase(own, ReadOnlyDatabase(DirectoryBasedExampleDatabase(shared)))
    return own


def register_hypothesis(environ: Mapping[str, str] = os.environ) -> None:
    """Register every profile with Hypothesis under its own name."""
    from hypothesis import HealthCheck, settings

    for p in PROFILES.values():
        settings.register_profile(
            p.name,
            parent=settings.get_profile(p.hypothesis_parent),
            database=hypothesis_database(environ) if p.keeps_database else None,
            suppress_health_check=[HealthCheck[h] for h in _SUPPRESS],
            **p.hypothesis,
        )


def load_hypothesis(environ: Mapping[str, str] = os.environ) -> Profile:
    """Register the profiles and load the default one (CI=true loads `ci`); returns it."""
    from hypothesis import settings

    register_hypothesis(environ)
    profile = current(environ)
    settings.load_profile(profile.name)
    return profile
