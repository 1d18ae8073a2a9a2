"""The qemu target: real qemu-io / qemu-img under test, host operations captured by QEMU's blklogwrites driver."""

from harness.targets.qemu.binaries import QemuBinaries, QemuMissing, find_binaries
from harness.targets.qemu.target import QemuTarget

__all__ = ["QemuTarget", "QemuBinaries", "QemuMissing", "find_binaries"]
