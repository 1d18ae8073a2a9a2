"""The profile registry: ci is derandomized without a database, nightly is not derandomized, and CI=true loads ci."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

from harness import profiles


def test_ci_profile_is_derandomized_without_database() -> None:
    ci = settings.get_profile("ci")
    assert ci.derandomize is True and ci.database is None


def test_nightly_profile_is_random_and_keeps_a_database() -> None:
    nightly = settings.get_profile("nightly")
    assert nightly.derandomize is False and nightly.database is not None
    assert nightly.max_examples > settings.get_profile("ci").max_examples


def test_every_profile_names_its_parent_and_grows_with_depth() -> None:
    assert profiles.NAMES == ("dev", "ci", "nightly")
    assert all(p.hypothesis_parent == "default" for p in profiles.PROFILES.values())
    dev, nightly = profiles.get("dev"), profiles.get("nightly")
    assert nightly.ops[1] > dev.ops[1] and nightly.budget.states_per_op > dev.budget.states_per_op
    assert nightly.machine_budget.states_per_op > dev.machine_budget.states_per_op


def test_unknown_profile_is_a_named_error() -> None:
    with pytest.raises(profiles.ProfileError, match="QCRASH_PROFILE = 'weekly': unknown profile; known: dev, ci, nightly"):
        profiles.current({"QCRASH_PROFILE": "weekly"})


@pytest.mark.parametrize("environ, name", [
    ({}, "dev"), ({"CI": "true"}, "ci"), ({"CI": "1"}, "ci"), ({"CI": "false"}, "dev"),
    ({"CI": "true", "QCRASH_PROFILE": "nightly"}, "nightly"),
])
def test_profile_follows_the_environment_when_asked(environ: dict, name: str) -> None:
    assert profiles.current(environ).name == name


def test_fuzz_default_ignores_the_test_session_profile() -> None:
    assert profiles.default_name({"QCRASH_PROFILE": "nightly"}) == "dev"
    assert profiles.default_name({"CI": "yes"}) == "ci"


def test_loaded_profile_follows_ci_variable() -> None:
    if os.environ.get("QCRASH_PROFILE"):
        pytest.skip("QCRASH_PROFILE names the profile explicitly; the CI variable is not consulted")
    loaded = settings()
    if profiles.in_ci():
        assert loaded.derandomize and loaded.database is None
    else:
        assert not loaded.derandomize and loaded.database is not None
