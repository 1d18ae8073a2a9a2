"""Fixtures of the unit tests: `img`, the path of a not-yet-created image in the test's own directory."""

import pytest


@pytest.fixture
def img(tmp_path):
    return tmp_path / "t.qcow2"
