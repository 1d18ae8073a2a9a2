"""The target spec: what reproducers record about the implementation under test, with named errors for bad fields."""

from __future__ import annotations

import pytest

from harness.targets.qemu.spec import PYTHON, TargetSpec, from_dict


def test_missing_target_field_is_the_python_target() -> None:
    assert from_dict(None, "r.json") == PYTHON


def test_round_trip() -> None:
    spec = TargetSpec("qemu", "/usr/bin/qemu-img", "/usr/bin/qemu-io", "7.2.22", "cache.no-flush=on")
    assert from_dict(spec.to_dict(), "r.json") == spec
    assert from_dict("qemu", "r.json") == TargetSpec("qemu")


@pytest.mark.parametrize("value, text", [
    (42, "must be a target name"),
    ({"name": "bochs"}, "target.name"),
    ({"name": "qemu", "colour": "red"}, "unknown key"),
])
def test_bad_target_fields_are_named(value, text) -> None:
    with pytest.raises(ValueError, match=text) as err:
        from_dict(value, "r.json")
    assert "r.json" in str(err.value)
