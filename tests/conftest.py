"""Shared pytest configuration: the Hypothesis profiles (from harness.profiles), the QEMU availability gate and injected bugs."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest

from harness import profiles
from models.qcow2 import inject

# QCRASH_PROFILE names the profile; otherwise CI=true loads `ci` and anything else `dev`.
profiles.load_hypothesis()


@pytest.fixture(autouse=True)
def injected() -> Iterator[Callable[..., None]]:
    """Injected bugs for one test: none at the start (whatever QCRASH_INJECT says), none after it.

    A test that wants bugs asks for this fixture and calls it: `injected("dirty-no-flush")`.
    In-process fuzzing (jobs=1) switches the example's bugs on in this process too; this
    resets them however the test ends.
    """
    inject.set_active([])
    yield lambda *names: inject.set_active(list(names))
    inject.set_active([])


def qemu_available() -> bool:
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


requires_qemu = pytest.mark.skipif(
    not qemu_available(),
    reason="qemu-img/qemu-io not found: install Debian's qemu-utils (the README's test command does this as root)",
)
