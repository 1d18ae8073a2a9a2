"""Laying out a fresh image as `qemu-img create -f qcow2` does (QEMU's qcow2_co_create): header, reftable, refblock, L1."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.blockio import BlockFile, CacheMode, WriteSite
from models.qcow2 import spec
from models.qcow2.errors import InvalidRequest
from models.qcow2.geometry import Geometry
from models.qcow2.header import cluster0_bytes, read_header
from models.qcow2.structs import Header

if TYPE_CHECKING:
    from models.qcow2.image import Qcow2Image


def _pow2_log(value: int, field: str, lo: int, hi: int) -> int:
    if value <= 0 or value & (value - 1) or not lo <= value.bit_length() - 1 <= hi:
        raise InvalidRequest(f"{field} = {value}: must be a power of two between {1 << lo} and {1 << hi}")
    return value.bit_length() - 1


def create(image_cls: "type[Qcow2Image]", file: BlockFile, size: int, *, version: int, cluster_size: int,
           refcount_bits: int, lazy_refcounts: bool) -> None:
    """Validate the options, write clusters 0-2, then count them and place the L1 through an open image."""
    if version not in (2, 3):
        raise InvalidRequest(f"{file.name}: compat/version {version}: must be 2 (0.10) or 3 (1.1)")
    cluster_bits = _pow2_log(cluster_size, "cluster_size", spec.MIN_CLUSTER_BITS, spec.MAX_CLUSTER_BITS)
    refcount_order = _pow2_log(refcount_bits, "refcount_bits", 0, spec.MAX_REFCOUNT_ORDER)
    if version == 2 and refcount_bits != 16:
        raise InvalidRequest(f"{file.name}: refcount_bits = {refcount_bits}: version 2 images require 16-bit refcounts")
    if lazy_refcounts and version < 3:
        raise InvalidRequest(f"{file.name}: lazy_refcounts=on: Lazy refcounts only supported with compatibility level 1.1 and above")
    if size < 0:
        raise InvalidRequest(f"{file.name}: size = {size}: must not be negative")
    size = (size + 511) // 512 * 512
    geo = Geometry(cluster_bits, refcount_order)
    if geo.size_to_l1(size) * 8 > spec.QCOW_MAX_L1_SIZE:
        raise InvalidRequest(f"{file.name}: size = {size}: the L1 table would exceed {spec.QCOW_MAX_L1_SIZE} bytes")
    cs = geo.cluster_size
    hdr = Header(version=version, cluster_bits=cluster_bits, refcount_table_offset=cs, refcount_table_clusters=1,
                 compatible_features=int(spec.CompatFeature.LAZY_REFCOUNTS) if lazy_refcounts else 0,
                 refcount_order=refcount_order if version >= 3 else 4,
                 header_length=spec.V3_HEADER_LENGTH if version >= 3 else spec.V2_HEADER_LENGTH)
    file.truncate(0)
    file.pwrite(0, cluster0_bytes(hdr, []), WriteSite.CREATE)
    file.pwrite(cs, (2 * cs).to_bytes(8, "big") + bytes(cs - 8), WriteSite.CREATE)
    file.pwrite(2 * cs, bytes(cs), WriteSite.CREATE)
    parsed = read_header(file, writable=True)
    img = image_cls(file, parsed, readonly=False, cache_mode=CacheMode.WRITEBACK, lazy_refcounts=False, log=None)
    first = img.alloc_clusters(3)
    assert first == 0, f"fresh image allocated its first clusters at {first:#x}"
    l1_size = geo.size_to_l1(size)
    if l1_size:
        l1_off = img.alloc_clusters(geo.size_to_clusters(l1_size * 8))
        img.refcache.flush()
        img._pwrite(l1_off, bytes(l1_size * 8), WriteSite.L1)
        img.hdr.l1_table_offset, img.hdr.l1_size = l1_off, l1_size
        img.l1 = [0] * l1_size
    img.hdr.size = size
    img.refcache.flush()
    img.io.update_header()
    img._file_flush()
    img.release()  # (closed; its reference cycles broken, so the file it holds goes with its last user)
