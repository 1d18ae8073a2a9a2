"""Size strings as QEMU's qemu_strtosz reads them (bytes, or k/M/G/T/P/E binary suffixes), shared by every CLI."""

from __future__ import annotations

import re

from harness.errors import QcrashError


class SizeError(QcrashError):
    """A size string breaks a rule; the message names what it was for, the text and the rule."""


# QEMU 7.2: leading blanks and a '+' are skipped (strtoull), the integer part is required
# ('.5M' is refused), nothing may follow the suffix ('1M ' is refused), and a hexadecimal
# number may still take a suffix (deprecated, with a warning, but accepted: '0x200k').
_SIZE_RE = re.compile(r"\+?(0[xX][0-9a-fA-F]+|\d+(?:\.\d*)?)([a-zA-Z]?)")
_SIZE_MULT = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60}


def parse_size(text: str, what: str = "size") -> int:
    """QEMU's qemu_strtosz: bytes, or a number with a k/K/M/G/T/P/E suffix (binary; fractions allowed with one)."""
    m = _SIZE_RE.fullmatch(text.lstrip(" \t\n\v\f\r"))
    if not m:
        raise SizeError(f"{what} '{text}': invalid; use bytes or a number with a k, M, G, T, P or E suffix")
    number, suffix = m.group(1), m.group(2).lower()
    if suffix not in _SIZE_MULT:
        raise SizeError(f"{what} '{text}': unknown suffix '{m.group(2)}' (use k, M, G, T, P or E)")
    mult = _SIZE_MULT[suffix]
    if number.lower().startswith("0x"):
        value = int(number, 16) * mult
    elif "." in number:
        if mult == 1:
            raise SizeError(f"{what} '{text}': a fraction needs a k, M, G, T, P or E suffix")
        whole, _, frac = number.partition(".")
        value = int(whole or "0") * mult + (int(frac) * mult // 10 ** len(frac) if frac else 0)
    else:
        value = int(number) * mult
    if value >= 1 << 63:
        raise SizeError(f"{what} '{text}': {value} is too large (must be below 2^63)")
    return value
