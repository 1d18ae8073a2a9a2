"""Test helper: the guest view of a qcow2 image parsed straight from its L1/L2 tables (independent of models.qcow2.image)."""

from __future__ import annotations

import struct

from models.qcow2 import spec
from models.qcow2.structs import Header


def guest_view(buf: bytes) -> dict[int, bytes]:
    """Guest cluster -> contents, for every allocated non-zero cluster (parsed from L1/L2 directly)."""
    hdr = Header.unpack(bytes(buf[:112]).ljust(112, b"\0"))
    cs = 1 << hdr.cluster_bits

    def rd(offset: int, n: int) -> bytes:
        return bytes(buf[offset : offset + n]).ljust(n, b"\0")

    out = {}
    for i in range(hdr.l1_size):
        l2 = struct.unpack(">Q", rd(hdr.l1_table_offset + 8 * i, 8))[0] & spec.L1E_OFFSET_MASK
        if not l2:
            continue
        for j, entry in enumerate(struct.unpack(f">{cs // 8}Q", rd(l2, cs))):
            offset = entry & spec.L2E_OFFSET_MASK
            if not offset or (hdr.version >= 3 and entry & 1):
                continue
            data = rd(offset, cs)
            if data.count(0) != cs:
                out[i * (cs // 8) + j] = data
    return out
