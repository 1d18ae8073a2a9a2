"""The qcow2 exception hierarchy: every message names the file, the offset, the field, the value and the rule."""

from __future__ import annotations


class Qcow2Error(Exception):
    """Base of every error the qcow2 implementation raises on purpose."""


class InvalidImage(Qcow2Error):
    """The image breaks a rule of the format (header, table or entry)."""

    def __init__(self, path: str, offset: int | None, field: str, value: object, rule: str) -> None:
        self.path, self.offset, self.field, self.value, self.rule = path, offset, field, value, rule
        where = f" at offset {offset:#x}" if offset is not None else ""
        shown = f"{value:#x}" if isinstance(value, int) and not isinstance(value, bool) else repr(value)
        super().__init__(f"{path}{where}: {field} = {shown}: {rule}")


class CorruptImage(InvalidImage):
    """Metadata found corrupt while using the image (QEMU would set the corrupt bit)."""


class UnsupportedFeature(Qcow2Error):
    """The image uses a qcow2 feature that qcrash does not implement (named)."""

    def __init__(self, path: str, offset: int | None, field: str, features: list[str], rule: str = "") -> None:
        self.path, self.offset, self.field, self.features = path, offset, field, features
        where = f" at offset {offset:#x}" if offset is not None else ""
        detail = f": {rule}" if rule else ""
        super().__init__(f"{path}{where}: {field}: unsupported qcow2 feature(s): {', '.join(features)}{detail}")


class ImageNotWritable(Qcow2Error):
    """A write was attempted on an image opened read-only, or marked corrupt."""


class InvalidRequest(Qcow2Error):
    """A guest request is out of range or malformed."""


class RepairFailed(Qcow2Error):
    """A dirty image could not be repaired on open ("Could not repair dirty image")."""


class HostRangeError(InvalidImage, ValueError):
    """A host byte range that no file can hold: negative, or ending at or beyond 2^63 (QEMU's INT64_MAX rule).

    It is an InvalidImage because such offsets only ever come from bad metadata; it is
    also a ValueError for callers that treated the old bare range check as one.
    """


class HostIOError(Qcow2Error, OSError):
    """The host file failed an operation (EIO, ENOSPC, EFBIG, ...): names the file, the operation and the range."""

    def __init__(self, path: str, op: str, offset: int, length: int, errno_: int, detail: str = "") -> None:
        import os

        self.path, self.op, self.offset, self.length = path, op, offset, length
        text = f"{path}: host {op} at offset {offset:#x} length {length:#x} failed: {os.strerror(errno_)}"
        OSError.__init__(self, errno_, text + (f" ({detail})" if detail else ""))

    def __str__(self) -> str:
        return str(self.strerror)


class MetadataOverlap(CorruptImage):
    """A write would land on active metadata: refused, and the image is marked corrupt (qcow2_check_metadata_overlap)."""


class ImageDead(ImageNotWritable):
    """The image signalled a fatal corruption event; like QEMU's bs->drv = NULL, every further request fails."""
