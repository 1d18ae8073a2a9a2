"""A pure-Python qcow2 (v2 and v3) implementation, byte-compatible with QEMU 7.2, with lazy refcounts."""

from models.qcow2.errors import (
    CorruptImage,
    ImageNotWritable,
    InvalidImage,
    InvalidRequest,
    Qcow2Error,
    RepairFailed,
    UnsupportedFeature,
)
from models.qcow2.image import CacheMode, Qcow2Image

__all__ = [
    "CacheMode",
    "CorruptImage",
    "ImageNotWritable",
    "InvalidImage",
    "InvalidRequest",
    "Qcow2Error",
    "Qcow2Image",
    "RepairFailed",
    "UnsupportedFeature",
]
