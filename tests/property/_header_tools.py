"""Helpers shared by the malformed-image tests: the file name every error must carry, and each header field's struct code and offset."""

from __future__ import annotations

from models.qcow2.structs import HEADER_FIELDS

KiB, MiB = 1 << 10, 1 << 20
NAME = "mut.qcow2"
FIELD_CODES = {name: (code, first) for name, code, first, _ in HEADER_FIELDS}
