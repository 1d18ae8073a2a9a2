"""The configuration space of a run: format version, cluster size, refcount width, lazy refcounts, cache mode, virtual size."""

from __future__ import annotations

import dataclasses
import random

from harness import serial, sizes
from harness.errors import QcrashError
from models.blockio import CacheMode

CLUSTER_SIZES = tuple(1 << b for b in range(9, 22))
REFCOUNT_BITS = (1, 2, 4, 8, 16, 32, 64)
CACHE_MODES = tuple(m.value for m in CacheMode)


class ConfigError(QcrashError):
    """A configuration value breaks a rule; the message names the key, the value and the rule."""


@dataclasses.dataclass(frozen=True, slots=True)
class Config:
    version: int = 3
    cluster_size: int = 4096
    refcount_bits: int = 16
    lazy_refcounts: bool = True
    cache_mode: str = "writethrough"
    virtual_size: int = 4 << 20

    def __post_init__(self) -> None:
        problems = self.validate()
        if problems:
            raise ConfigError("; ".join(problems))

    def validate(self) -> list[str]:
        p = []
        if self.version not in (2, 3):
            p.append(f"version={self.version}: must be 2 or 3")
        if self.cluster_size not in CLUSTER_SIZES:
            p.append(f"cluster_size={self.cluster_size}: must be a power of two from 512 to 2097152")
        if self.refcount_bits not in REFCOUNT_BITS:
            p.append(f"refcount_bits={self.refcount_bits}: must be a power of two from 1 to 64")
        if self.version == 2 and self.refcount_bits != 16:
            p.append(f"refcount_bits={self.refcount_bits}: version 2 requires 16")
        if self.version == 2 and self.lazy_refcounts:
            p.append("lazy_refcounts=on: requires version 3")
        if self.cache_mode not in CACHE_MODES:
            p.append(f"cache_mode={self.cache_mode}: must be one of {', '.join(CACHE_MODES)}")
        if self.virtual_size <= 0 or self.virtual_size % 512:
            p.append(f"virtual_size={self.virtual_size}: must be a positive multiple of 512")
        return p

    def __str__(self) -> str:
        return (f"v{self.version} cluster_size={self.cluster_size} refcount_bits={self.refcount_bits} "
                f"lazy_refcounts={'on' if self.lazy_refcounts else 'off'} cache={self.cache_mode} "
                f"size={self.virtual_size}")

    def to_dict(self) -> dict:
        return serial.to_data(self)  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "config") -> "Config":
        try:
            return serial.from_data(cls, data, where=where)
        except serial.SerialError as exc:
            raise ConfigError(str(exc)) from None

    def with_overrides(self, overrides: dict[str, str]) -> "Config":
        """Apply `K=V` strings from the command line (--config cluster_size=512,lazy_refcounts=off)."""
        data = self.to_dict()
        for key, raw in overrides.items():
            if key not in data:
                raise ConfigError(f"--config {key}={raw}: unknown key; known: {', '.join(data)}")
            data[key] = parse_value(key, raw)
        return Config(**data)


def parse_value(key: str, raw: str) -> object:
    if key == "lazy_refcounts":
        return parse_bool(raw, f"--config {key}")
    if key == "cache_mode":
        return raw
    try:
        return sizes.parse_size(raw, f"--config {key}")
    except sizes.SizeError as exc:
        raise ConfigError(str(exc)) from None


def parse_bool(text: str, what: str) -> bool:
    """An on/off switch as QEMU's qapi_bool_parse reads it: on, yes, true, y or off, no, false, n."""
    low = text.lower()
    if low in ("on", "yes", "true", "y"):
        return True
    if low in ("off", "no", "false", "n"):
        return False
    raise ConfigError(f"{what} = '{text}': must be on or off")


def draw_config(rng: random.Random, fixed: dict[str, object] | None = None) -> Config:
    """Draw a configuration, weighted toward small clusters (more metadata per byte of data)."""
    fixed = fixed or {}
    version = fixed.get("version", rng.choice((2, 3, 3, 3)))
    # Large clusters cost far more per crash state (tables are a cluster each) and hold less
    # metadata per byte written: keep them, but rarely.
    cluster_bits = rng.choices(range(9, 22), weights=[24, 16, 12, 10, 8, 6, 5, 3, 2, 1.5, 1, 0.5, 0.5])[0]
    cluster_size = fixed.get("cluster_size", 1 << cluster_bits)
    # Wide refcounts on small clusters make refcount blocks cover little: new blocks and
    # refcount-table growth come within reach of a short sequence.
    weights = (1, 1, 1, 1, 3, 1, 4) if cluster_size <= 1024 else (1, 1, 1, 1, 2, 1, 1)
    refcount_bits = fixed.get("refcount_bits", 16 if version == 2 else rng.choices(REFCOUNT_BITS, weights)[0])
    lazy = fixed.get("lazy_refcounts", version == 3 and rng.random() < 0.6)
    cache = fixed.get("cache_mode", rng.choice(CACHE_MODES))
    size = fixed.get("virtual_size", max(cluster_size * 8, rng.choice((1, 1, 2, 4, 4, 8)) << 20))
    return Config(version=version, cluster_size=cluster_size, refcount_bits=refcount_bits,
                  lazy_refcounts=lazy, cache_mode=cache, virtual_size=size)
