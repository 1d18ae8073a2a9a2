"""The typed serialiser: every bad field of a reproducer is a named error; the published schema is the loader's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import serial
from harness.config import Config
from harness.fuzz import corpus
from harness.ops import Crash, Op, Write, op_from_dict, op_to_dict
from harness.oracle import Finding, Verdict
from harness.runner import Budget

ROOT = Path(__file__).resolve().parents[2]
GOOD = sorted((ROOT / "corpora").rglob("*.json"))
GOOD = [p for p in GOOD if not p.name.endswith(".schema.json") and p.parent.name != "hostile"]  # hostile: image cases, not reproducers


def _good() -> dict:
    return json.loads((ROOT / "corpora" / "oracle" / "dirty-no-flush.json").read_text())


@pytest.mark.parametrize("path, value, field, rule", [
    (("count",), "many", "count", "must be a whole number"),
    (("config", "cluster_size"), "big", "config.cluster_size", "must be a whole number"),
    (("config", "lazy_refcounts"), "yes", "config.lazy_refcounts", "must be true or false"),
    (("ops", 1, "offset"), "zero", "ops[1].offset", "must be a whole number (Write.offset)"),
    (("ops", 1, "op"), "Explode", "ops[1].op", "must name one of Write, WriteZeroes"),
    (("budget", "policies"), "subsets", "budget.policies", "must be a list"),
    (("finding", "verdict"), "bad", "finding.verdict", "must be one of data-lost"),
    (("seed",), None, "seed", "must be a whole number"),
    (("inject",), ["no-such-bug"], "inject", "unknown bug name(s); known:"),
    (("ops", 1, "length"), 100, "ops[1]", "must be a non-negative multiple of 512"),
])
def test_bad_field_is_named(tmp_path: Path, path: tuple, value: object, field: str, rule: str) -> None:
    data = _good()
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(data))
    with pytest.raises(corpus.ReproducerError) as err:
        corpus.load(f)
    text = str(err.value)
    assert text.startswith(f"{f}: ") and f"'{field}" in text and rule in text, text
    if path != ("ops", 1, "length"):
        assert repr(value) in text, text


def test_unknown_and_missing_fields_are_named(tmp_path: Path) -> None:
    data = _good()
    data["config"]["colour"] = "red"
    with pytest.raises(corpus.ReproducerError, match=r"field 'config.colour' = 'red': not a field of Config"):
        corpus.from_dict(data, "x.json")
    data = _good()
    del data["seed"]
    with pytest.raises(corpus.ReproducerError, match=r"x.json: field 'seed' = None: missing"):
        corpus.from_dict(data, "x.json")


def test_replay_of_count_many_is_a_named_error_not_a_traceback(tmp_path: Path) -> None:
    data = _good()
    data["count"] = "many"
    f = tmp_path / "many.json"
    f.write_text(json.dumps(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("QCRASH_INJECT", None)
    proc = subprocess.run([sys.executable, "-m", "harness", "replay", str(f)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{f}: field 'count' = 'many': must be a whole number" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_round_trip_of_every_type() -> None:
    finding = Finding(Verdict.DATA_LOST, "r", "e", 3, "raw", "p=1 prefix keep=0", "prefix", 7, "Write")
    for tp, value in ((Config, Config(cluster_size=512)), (Op, Write(512, 1024, 9)), (Op, Crash(-2, "torn", 3)),
                      (Budget, Budget(samples=3)), (Finding, finding)):
        data = serial.to_data(value, tp)
        assert serial.from_data(tp, json.loads(json.dumps(data)), where="t") == value
    assert op_from_dict(op_to_dict(Crash(crash_id="p=3 prefix keep=0-2"))) == Crash(crash_id="p=3 prefix keep=0-2")


def test_published_schema_is_the_loaders_schema() -> None:
    published = json.loads((ROOT / "corpora" / "reproducer.schema.json").read_text())
    assert published == corpus.schema(), "regenerate corpora/reproducer.schema.json from harness.fuzz.corpus.schema()"


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_corpora_follow_the_published_schema(path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is a test dependency (pip install -e .[test])")
    schema = json.loads((ROOT / "corpora" / "reproducer.schema.json").read_text())
    data = json.loads(path.read_text())
    jsonschema.validate(data, schema)
    bad = dict(data, count="many")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
