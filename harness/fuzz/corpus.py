"""Reproducer files: one small versioned JSON file per finding signature, written atomically, loaded with named errors."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from harness import __version__
from harness.config import Config, ConfigError
from harness.ops import Op, OpError, op_from_dict, op_to_dict
from harness.oracle import Finding
from harness.runner import Budget
from harness.targets.qemu.spec import PYTHON, TargetSpec
from harness.targets.qemu.spec import from_dict as target_from_dict

FORMAT = "qcrash-reproducer"
FORMAT_VERSION = 1


class ReproducerError(ValueError):
    """A reproducer file is malformed; the message names the file and the field."""


@dataclasses.dataclass
class Reproducer:
    config: Config
    ops: list[Op]
    seed: int  # the runner seed: it fixes sampled crash-state enumeration
    budget: Budget
    finding: Finding | None = None
    example_seed: int | None = None
    inject: list[str] = dataclasses.field(default_factory=list)
    count: int = 1
    harness_version: str = __version__
    shrunk_from: int | None = None  # operations before shrinking
    target: TargetSpec = PYTHON  # the implementation under test (and its version)

    @property
    def signature(self) -> str:
        return self.finding.signature() if self.finding else "none"

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "harness_version": self.harness_version,
            "config": self.config.to_dict(), "seed": self.seed, "example_seed": self.example_seed,
            "budget": dataclasses.asdict(self.budget), "inject": list(self.inject),
            "ops": [op_to_dict(op) for op in self.ops],
            "finding": self.finding.to_dict() if self.finding else None,
            "signature": self.signature, "count": self.count, "shrunk_from": self.shrunk_from,
            "target": self.target.to_dict(),
            "python": self.python(),
        }

    def python(self) -> str:
        """A runnable reproduction (also stored in the file, for reading)."""
        ops = ", ".join(repr(op) for op in self.ops)
        return (f"from harness.ops import *; from harness.config import Config; from harness.runner import Runner, Budget\n"
                f"Runner({self.config!r}, seed={self.seed}, budget={self.budget!r}"
                f"{'' if self.target.name == 'python' else f', target={self.target.name!r}'}).run([{ops}])")


def load(path: str | os.PathLike[str]) -> Reproducer:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ReproducerError(f"{path}: cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ReproducerError(f"{path}: line {exc.lineno} column {exc.colno}: not JSON: {exc.msg}") from None
    return from_dict(data, str(path))


def from_dict(data: object, where: str) -> Reproducer:
    def need(key: str, kind: type | tuple[type, ...]) -> object:
        if key not in data:
            raise ReproducerError(f"{where}: field '{key}' is missing")
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ReproducerError(f"{where}: field '{key}' = {value!r}: wrong type")
        return value

    if not isinstance(data, dict):
        raise ReproducerError(f"{where}: the top level must be a JSON object")
    if data.get("format") != FORMAT:
        raise ReproducerError(f"{where}: field 'format' = {data.get('format')!r}: must be {FORMAT!r}")
    version = need("format_version", int)
    if version != FORMAT_VERSION:
        raise ReproducerError(f"{where}: field 'format_version' = {version}: this qcrash reads version {FORMAT_VERSION}")
    try:
        config = Config.from_dict(need("config", dict), where=f"{where}: field 'config'")
        ops = [op_from_dict(o, f"{where}: field 'ops[{i}]'") for i, o in enumerate(need("ops", list))]
    except (ConfigError, OpError) as exc:
        raise ReproducerError(str(exc)) from None
    budget_raw = need("budget", dict)
    try:
        budget_raw = {k: tuple(v) if isinstance(v, list) else v for k, v in budget_raw.items()}
        budget = Budget(**budget_raw)
    except TypeError as exc:
        raise ReproducerError(f"{where}: field 'budget': {exc}") from None
    finding = None
    if data.get("finding") is not None:
        try:
            finding = Finding.from_dict(need("finding", dict))
        except (TypeError, ValueError) as exc:
            raise ReproducerError(f"{where}: field 'finding': {exc}") from None
    inject = need("inject", list) if "inject" in data else []
    try:
        target = target_from_dict(data.get("target"), where)
    except ValueError as exc:
        raise ReproducerError(str(exc)) from None
    return Reproducer(config, ops, need("seed", int), budget, finding, data.get("example_seed"), list(inject),
                      int(data.get("count", 1)), str(data.get("harness_version", "?")), data.get("shrunk_from"),
                      target)


def atomic_write_json(path: Path, data: dict) -> None:
    """Write then rename, so a reader (or a kill -9) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=1, sort_keys=False)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def file_name(rep: Reproducer) -> str:
    assert rep.finding is not None
    bugs = "+".join(rep.inject) or "main"
    return f"{rep.finding.verdict}-{rep.finding.short_signature()}-{bugs}.json"


def record(corpus: Path, rep: Reproducer) -> Path:
    """Save a finding, deduplicated by signature: a repeat only bumps the count of the existing file."""
    path = corpus / file_name(rep)
    if path.exists():
        try:
            old = load(path)
            old.count += rep.count
            atomic_write_json(path, old.to_dict())
            return path
        except ReproducerError:
            pass  # a damaged file is replaced by the new finding
    atomic_write_json(path, rep.to_dict())
    return path
