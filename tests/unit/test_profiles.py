"""The Hypothesis profiles: ci is derandomized without a database; nightly is not derandomized."""

from __future__ import annotations

import os

from hypothesis import settings


def test_ci_profile_is_derandomized_without_database() -> None:
    ci = settings.get_profile("ci")
    assert ci.derandomize is True and ci.database is None


def test_nightly_profile_is_random_and_keeps_a_database() -> None:
    nightly = settings.get_profile("nightly")
    assert nightly.derandomize is False and nightly.database is not None
    assert nightly.max_examples > settings.get_profile("ci").max_examples


def test_loaded_profile_follows_ci_variable() -> None:
    loaded = settings()
    if os.environ.get("QCRASH_PROFILE"):
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        assert loaded.derandomize and loaded.database is None
    else:
        assert not loaded.derandomize
