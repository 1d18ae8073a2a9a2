"""Shared pytest configuration: Hypothesis profiles and the QEMU availability gate."""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

def _database():
    """The example database: QCRASH_HYPOTHESIS_DB (default .hypothesis/examples), plus, when
    QCRASH_SHARED_DB names one, a shared database of known failures that shards read but never write."""
    from hypothesis.database import DirectoryBasedExampleDatabase, MultiplexedDatabase, ReadOnlyDatabase

    own = DirectoryBasedExampleDatabase(os.environ.get("QCRASH_HYPOTHESIS_DB", ".hypothesis/examples"))
    shared = os.environ.get("QCRASH_SHARED_DB")
    if shared:
        return MultiplexedDatabase(own, ReadOnlyDatabase(DirectoryBasedExampleDatabase(shared)))
    return own


# Every profile names its parent explicitly, so `nightly` is never silently derandomized
# by inheriting from `ci`.
_default = settings.get_profile("default")
settings.register_profile(
    "dev",
    parent=_default,
    database=_database(),
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "ci",
    parent=_default,
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "nightly",
    parent=_default,
    database=_database(),
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _profile_name() -> str:
    explicit = os.environ.get("QCRASH_PROFILE")
    if explicit:
        return explicit
    return "ci" if os.environ.get("CI", "").lower() in ("1", "true", "yes") else "dev"


settings.load_profile(_profile_name())


def qemu_available() -> bool:
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


requires_qemu = pytest.mark.skipif(
    not qemu_available(),
    reason="qemu-img/qemu-io not found: install Debian's qemu-utils (the README's test command does this as root)",
)
