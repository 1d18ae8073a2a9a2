"""Collect every reproducer file under corpora/ as a regression test.

- A file without injected bugs (a real bug that was fixed) must replay with no finding.
- A file recorded with injected bugs guards the oracle: with the bugs on it must still
  fail with the same verdict, and with them off it must pass.
"""

from __future__ import annotations

import pytest


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".json" and file_path.parent.name == "hostile":
        return HostileImageFile.from_parent(parent, path=file_path)
    if file_path.suffix == ".json" and not file_path.name.endswith(".schema.json") and file_path.name != "package.json":
        return ReproducerFile.from_parent(parent, path=file_path)
    return None


def _check_schema(path) -> None:
    """Every file under corpora/ follows the published format (corpora/reproducer.schema.json)."""
    import json
    from pathlib import Path

    try:
        import jsonschema
    except ImportError:  # tests/harness/test_serial.py says so, as a skip; the replay below still runs
        return
    published = Path(__file__).parent / "reproducer.schema.json"
    if published.exists():
        schema = json.loads(published.read_text())
    else:  # a copy of this conftest elsewhere: the schema the loader itself follows
        from harness.fuzz.corpus import schema as make_schema

        schema = make_schema()
    jsonschema.validate(json.loads(path.read_text()), schema)


class HostileImageFile(pytest.File):
    """corpora/hostile/: shrunk malformed images from `qcrash fuzz-images` (harness/fuzz/imagerun.py)."""

    def collect(self):
        yield HostileImageItem.from_parent(self, name=self.path.name)


class HostileImageItem(pytest.Item):
    """The step that once failed (unexpected exception, over memory, wrong result, ...) now works or fails by name.

    Replayed without a clock (no timed assertions): an over-time finding must still end
    with a result or a named error.
    """

    def runtest(self) -> None:
        import json

        from harness.fuzz import imagecase, imagerun
        from harness.fuzz.images import ImageCase

        obj = json.loads(self.path.read_text())
        assert obj.get("format") == imagerun.FORMAT, f"{self.path}: not a {imagerun.FORMAT} file"
        case = ImageCase.from_json(obj["case"])
        step = obj["failure"]["step"]
        got = imagecase.run_library(case.build(), name=self.path.name, time_limit=float("inf"), hard_limit=0,
                                    steps=(step,))[0]
        assert got.cls in ("result", "named"), (
            f"{self.path}: {step} still fails: {got.cls}: {got.detail} (was {obj['failure']['class']})")

    def reportinfo(self):
        return self.path, 0, f"hostile image {self.path.name}"


class ReproducerFile(pytest.File):
    def collect(self):
        yield ReproducerItem.from_parent(self, name=self.path.name)


class ReproducerItem(pytest.Item):
    def runtest(self) -> None:
        from harness.fuzz.corpus import load
        from harness.runner import Runner
        from models.qcow2 import inject

        _check_schema(self.path)
        rep = load(self.path)
        previous = inject.active()
        try:
            inject.set_active([])
            clean = Runner(rep.config, seed=rep.seed, budget=rep.budget).run(rep.ops)
            assert not clean, f"{self.path}: fails without injected bugs: {clean[0]}"
            if rep.inject:
                inject.set_active(rep.inject)
                found = Runner(rep.config, seed=rep.seed, budget=rep.budget).run(rep.ops)
                assert found, f"{self.path}: the oracle no longer catches {', '.join(rep.inject)}"
                if rep.finding is not None:
                    assert found[0].verdict == rep.finding.verdict, (
                        f"{self.path}: verdict changed: {found[0].verdict} != {rep.finding.verdict}")
        finally:
            inject.set_active(previous)

    def reportinfo(self):
        return self.path, 0, f"reproducer {self.path.name}"
