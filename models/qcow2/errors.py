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
