"""Shared pytest configuration: the Hypothesis profiles (from harness.profiles), the QEMU availability gate and injected bugs."""

from __future__ import annotations

import shutil

import pytest

from harness import profiles

# QCRASH_PROFILE names the profile; otherwise CI=true loads `ci` and anything else `dev`.
profiles.load_hypothesis()


def qemu_available() -> bool:
    return shutil.which("qemu-img") is not None and shutil.which("qemu-io") is not None


requires_qemu = pytest.mark.skipif(
    not qemu_available(),
    reason="qemu-img/qemu-io not found: install Debian's qemu-utils (the README's test command does this as root)",
)
