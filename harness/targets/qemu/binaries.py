"""Which qemu-img and qemu-io the qemu target runs: found on PATH, named by --qemu-img/--qemu-io, or taken from a directory; with their version."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess

__all__ = ["QemuBinaries", "QemuMissing", "find_binaries", "INSTALL_HINT"]

INSTALL_HINT = ("install Debian's qemu-utils (apt-get install qemu-utils), or name the binaries with "
                "--qemu-img PATH --qemu-io PATH (or --qemu-img DIR holding both)")


class QemuMissing(Exception):
    """qemu-img or qemu-io cannot be found or run; the message names what to install (the CLI exits 2)."""


@dataclasses.dataclass(frozen=True, slots=True)
class QemuBinaries:
    """Absolute paths of the two tools and the version string qemu-io reports (recorded in reports and reproducers)."""

    qemu_img: str
    qemu_io: str
    version: str  # e.g. "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"

    @property
    def short_version(self) -> str:
        """Major.minor, e.g. "7.2": the corpus directory name for known QEMU behaviour."""
        m = re.match(r"(\d+)\.(\d+)", self.version)
        return f"{m.group(1)}.{m.group(2)}" if m else self.version

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _resolve(tool: str, given: str | None) -> str:
    if given:
        path = os.path.join(given, tool) if os.path.isdir(given) else given
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise QemuMissing(f"{tool}: {path!r} is not an executable file; {INSTALL_HINT}")
        return os.path.abspath(path)
    found = shutil.which(tool)
    if found is None:
        raise QemuMissing(f"{tool} not found on PATH; {INSTALL_HINT}")
    return found


def find_binaries(qemu_img: str | None = None, qemu_io: str | None = None) -> QemuBinaries:
    """Locate both tools and read the version; a directory given for one is used for the other too."""
    if qemu_img and os.path.isdir(qemu_img) and not qemu_io:
        qemu_io = qemu_img
    if qemu_io and os.path.isdir(qemu_io) and not qemu_img:
        qemu_img = qemu_io
    img = _resolve("qemu-img", qemu_img)
    io = _resolve("qemu-io", qemu_io)
    return QemuBinaries(img, io, _version(io))


def _version(tool: str) -> str:
    try:
        proc = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise QemuMissing(f"{tool}: cannot run it ({exc}); {INSTALL_HINT}") from None
    m = re.search(r"version (\S+(?: \([^)]*\))?)", proc.stdout)
    if proc.returncode != 0 or m is None:
        raise QemuMissing(f"{tool} --version exited {proc.returncode} without a version line; {INSTALL_HINT}")
    return m.group(1)
