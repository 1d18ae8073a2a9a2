"""Reproducer files: one small versioned JSON file per finding signature, written atomically, loaded with named errors."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from harness import __version__
from harness import serial
from harness.targets.qemu.spec import QemuDetail
from harness.config import Config
from harness.errorpoints import ErrorCase
from harness.errors import QcrashError
from harness.ops import Op, OpError, validate_op
from harness.oracle import Finding
from harness.runner import Budget
from models.qcow2 import inject

FORMAT = "qcrash-reproducer"
FORMAT_VERSION = 1
# Written for people and tools, recomputed from the fields on every write, ignored on load.
DERIVED = ("format", "format_version", "signature", "crash_state", "python")


class ReproducerError(QcrashError):
    """A reproducer file is malformed; the message names the file, the field, the value and the rule."""


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
    target: str = "python"  # what ran the operations: the pure-Python qcow2 model, or real QEMU
    qemu: QemuDetail | None = None  # with target "qemu": the QEMU version and extra driver options
    errors: ErrorCase | None = None  # an error-point finding: the failed host operation and variant it replays with

    @property
    def signature(self) -> str:
        return self.finding.signature() if self.finding else "none"

    def to_dict(self, crash_state: str | None = None) -> dict:
        head = {"format": FORMAT, "format_version": FORMAT_VERSION}
        tail = {"signature": self.signature, "crash_state": crash_state, "python": self.python()}
        return {**head, **serial.to_data(self), **tail}  # type: ignore[dict-item]

    def python(self) -> str:
        """A runnable reproduction, injected bugs included (also stored in the file, for reading)."""
        ops = ", ".join(repr(op) for op in self.ops)
        if self.errors is not None:
            return ("from harness.ops import *; from harness.config import Config; from harness.faultfile import *\n"
                    "from harness.errorpoints import ErrorCase, replay\n"
                    f"from models.qcow2 import inject; inject.set_active({sorted(self.inject)!r})\n"
                    f"print(replay({self.config!r}, [{ops}], {self.errors.source()}))")
        return ("from harness.ops import *; from harness.config import Config; from harness.runner import Runner, Budget\n"
                f"from models.qcow2 import inject; inject.set_active({sorted(self.inject)!r})\n"
                f"print(Runner({self.config!r}, seed={self.seed}, budget={self.budget!r}).run([{ops}]))")


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
    if not isinstance(data, dict):
        raise ReproducerError(f"{where}: the top level must be a JSON object")
    if data.get("format") != FORMAT:
        raise ReproducerError(f"{where}: field 'format' = {data.get('format')!r}: must be {FORMAT!r}")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ReproducerError(f"{where}: field 'format_version' = {version!r}: this qcrash reads version {FORMAT_VERSION}")
    body = {k: v for k, v in data.items() if k not in DERIVED}
    try:
        rep = serial.from_data(Reproducer, body, where=where)
        for i, op in enumerate(rep.ops):
            validate_op(op, rep.config, f"{where}: field 'ops[{i}]'")
        if rep.count < 1:
            raise serial.SerialError(where, "count", rep.count, "must be at least 1")
        known = inject.BUGS.keys() | inject.ERROR_BUGS.keys()
        unknown = sorted(set(rep.inject) - known)
        if unknown:
            raise serial.SerialError(where, "inject", unknown, f"unknown bug name(s); known: {', '.join(sorted(known))}")
    except (serial.SerialError, OpError) as exc:
        raise ReproducerError(str(exc)) from None
    return rep


def schema() -> dict:
    """The JSON Schema of a reproducer file, from the same type hints the loader reads (corpora/reproducer.schema.json)."""
    defs: dict[str, dict] = {}
    body = serial.schema(Reproducer, defs)
    top = defs.pop("Reproducer")
    assert body == {"$ref": "#/$defs/Reproducer"}
    top["properties"] = {"format": {"const": FORMAT}, "format_version": {"const": FORMAT_VERSION},
                         **top["properties"], "signature": {"type": "string"},
                         "crash_state": {"type": ["string", "null"]}, "python": {"type": "string"}}
    top["required"] = ["format", "format_version", *top["required"]]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "qcrash reproducer",
            "description": "One finding: configuration, operations, crash-state choice, verdict and injected bugs. "
                           "Written by qcrash fuzz and shrink; read by qcrash replay and the corpora tests.",
            **top, "$defs": dict(sorted(defs.items()))}


def atomic_write(path: Path, data: bytes) -> None:
    """Write then rename, so a reader (or a kill -9) never sees half a file; the mode follows the umask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp creates 0600; a report is for the team, so give it the mode open() would.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: set it straight back
    os.umask(mask)
    return mask


def atomic_write_json(path: Path, data: dict) -> None:
    atomic_write(path, (json.dumps(data, indent=1) + "\n").encode())


def file_name(rep: Reproducer) -> str:
    """Named after the finding's signature (the same before and after shrinking) and the injected bugs."""
    assert rep.finding is not None
    bugs = "+".join(rep.inject) or "main"
    return f"{rep.finding.verdict}-{rep.finding.short_signature()}-{bugs}.json"


def sidecars(path: Path) -> tuple[Path, Path]:
    """The crash image and the host-op log kept beside a finding file."""
    return path.with_suffix(".qcow2"), path.with_suffix(".ops.txt")


def record(corpus: Path, rep: Reproducer) -> Path:
    """Save a finding, deduplicated by signature: a repeat only bumps the count of the existing file."""
    path = corpus / file_name(rep)
    if path.exists() and bump_count(path, rep.count):
        return path
    atomic_write_json(path, rep.to_dict())
    return path


def bump_count(path: Path, by: int = 1) -> bool:
    """Add hits to a finding file, leaving everything else as written; False if the file is damaged."""
    try:
        data = json.loads(path.read_text())
        from_dict(data, str(path))
    except (OSError, ValueError):
        return False
    data["count"] += by
    atomic_write_json(path, data)
    return True


def save(path: Path, rep: Reproducer, evidence=None) -> None:
    """Rewrite a finding (shrunk) with the hits counted so far, and its evidence beside it."""
    try:
        rep = dataclasses.replace(rep, count=max(rep.count, json.loads(path.read_text()).get("count", 1)))
    except (OSError, ValueError, TypeError):
        pass
    image, oplog = sidecars(path)
    if evidence is not None and evidence.image is not None:
        atomic_write(image, evidence.image)
        atomic_write(oplog, evidence.oplog.encode())
    atomic_write_json(path, rep.to_dict(crash_state=evidence.words if evidence is not None else None))
