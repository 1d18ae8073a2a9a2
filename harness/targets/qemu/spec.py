"""How a run names its implementation under test (`--target`, `--qemu-img`, `--qemu-io`): a small picklable spec, recorded in reproducers and reports."""

from __future__ import annotations

import argparse
import dataclasses

from harness.targets import Target, get_target, target_names

__all__ = ["QemuDetail", "detail_of", "spec_of", "TargetSpec", "add_arguments", "from_args", "from_dict", "known_dirs", "make", "release", "PYTHON"]


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """A target name and its constructor options; `version` is what the implementation reported (informational)."""

    name: str = "python"
    qemu_img: str | None = None
    qemu_io: str | None = None
    version: str | None = None
    qemu_opts: str | None = None  # extra qcow2 driver options on every live open, e.g. "cache.no-flush=on"

    def make(self) -> Target:
        if self.name == "qemu":
            return get_target("qemu", qemu_img=self.qemu_img, qemu_io=self.qemu_io, extra_opts=self.qemu_opts or "")
        return get_target(self.name)

    def resolved(self) -> "TargetSpec":
        """With QEMU's binaries found and its version read (raises QemuMissing naming what to install)."""
        if self.name != "qemu":
            return self
        from harness.targets.qemu.binaries import find_binaries

        bins = find_binaries(self.qemu_img, self.qemu_io)
        return TargetSpec("qemu", bins.qemu_img, bins.qemu_io, bins.version, self.qemu_opts)

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


PYTHON = TargetSpec()


@dataclasses.dataclass(frozen=True)
class QemuDetail:
    """What a reproducer records beside `target: "qemu"`: the QEMU version it ran, and extra driver options."""

    version: str | None = None
    qemu_opts: str | None = None


def spec_of(name: str, detail: "QemuDetail | None" = None) -> TargetSpec:
    """The spec a reproducer names (binaries are this machine's: PATH, unless the command line says otherwise)."""
    if name != "qemu":
        return TargetSpec(name)
    return TargetSpec("qemu", version=detail.version if detail else None, qemu_opts=detail.qemu_opts if detail else None)


def detail_of(spec: TargetSpec) -> "QemuDetail | None":
    return QemuDetail(spec.version, spec.qemu_opts) if spec.name == "qemu" else None


def from_dict(data: object, where: str) -> TargetSpec:
    """A spec from a reproducer's "target" field: a name, or an object with name/qemu_img/qemu_io/version."""
    if data is None:
        return PYTHON
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise ValueError(f"{where}: field 'target' = {data!r}: must be a target name or an object with a 'name'")
    unknown = set(data) - {f.name for f in dataclasses.fields(TargetSpec)}
    if unknown:
        raise ValueError(f"{where}: field 'target' has unknown key(s) {', '.join(sorted(unknown))}")
    if data["name"] not in target_names():
        raise ValueError(f"{where}: field 'target.name' = {data['name']!r}: one of {', '.join(target_names())}")
    return TargetSpec(**data)


def add_arguments(parser: argparse.ArgumentParser, *, default: str | None = "python") -> None:
    parser.add_argument("--target", choices=target_names(), default=default,
                        help="implementation under test: python (models/qcow2) or qemu (real qemu-io/qemu-img)"
                        + ("" if default else "; default: the one the reproducer names"))
    parser.add_argument("--qemu-img", default=None, metavar="PATH",
                        help="qemu-img binary, or a directory holding qemu-img and qemu-io (default: PATH)")
    parser.add_argument("--qemu-io", default=None, metavar="PATH", help="qemu-io binary (default: PATH)")
    parser.add_argument("--qemu-opts", default=None, metavar="OPTS",
                        help="extra qcow2 options on every live QEMU open, e.g. cache.no-flush=on (to see the oracle fail)")


def from_args(args: argparse.Namespace, recorded: TargetSpec | None = None) -> TargetSpec:
    """The spec the command line asks for (binaries override a recorded spec's); QEMU resolved and checked."""
    base = recorded or PYTHON
    name = args.target or base.name
    if name != base.name:
        base = TargetSpec(name)
    # Recorded binary paths are the recording machine's: replay takes the command line's, or PATH.
    opts = args.qemu_opts if args.qemu_opts is not None else base.qemu_opts
    spec = TargetSpec(name, args.qemu_img, args.qemu_io, None, opts)
    if (args.qemu_img or args.qemu_io or args.qemu_opts) and name != "qemu":
        raise ValueError("--qemu-img/--qemu-io/--qemu-opts: only meaningful with --target qemu")
    return spec.resolved()


def make(spec: "TargetSpec | None") -> Target | str:
    """What `Runner(target=...)` takes: a new target for a spec, or "python" when there is none."""
    return spec.make() if spec is not None and spec.name != "python" else "python"


def release(target: object) -> None:
    """End a target's processes now (QEMU); the python target has none."""
    stop = getattr(target, "release", None)
    if stop is not None:
        stop()


def known_dirs(spec: TargetSpec) -> list[str]:
    """Known QEMU behaviour for this QEMU version (corpora/qemu-<major.minor>/), replayed as `--known` by default."""
    if spec.name != "qemu" or not spec.version:
        return []
    import re
    from pathlib import Path

    m = re.match(r"(\d+\.\d+)", spec.version)
    directory = Path(__file__).resolve().parents[3] / "corpora" / f"qemu-{m.group(1) if m else spec.version}"
    return [str(directory)] if directory.is_dir() and any(directory.glob("*.json")) else []
