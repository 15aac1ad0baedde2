"""Parse human units from YAML and CLI input into SI numbers (bytes, seconds, FLOP/s, bytes/s).

Profiles state numbers as their sources do ("989 TFLOP/s", "3.35 TB/s", "80 GiB", "2 us");
everything inside plansim is SI, so conversion happens exactly once, here.
"""
from __future__ import annotations

import re

_PREFIX = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}

_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
_PATTERN = re.compile(rf"^\s*{_NUMBER}\s*([A-Za-zµ/]*)\s*$")

#: unit family -> the suffixes (after an SI or binary prefix) it accepts
UNIT_KINDS = {
    "bytes": ("B",),
    "bytes_per_s": ("B/s", "Bps"),
    "bits_per_s": ("b/s", "bps"),
    "flops": ("FLOP/s", "FLOPS"),
    "seconds": tuple(_TIME),
    "hertz": ("Hz",),
}


class UnitError(ValueError):
    """A value whose unit is missing, unknown or of the wrong kind."""


def parse_quantity(value: float | int | str, kind: str) -> float:
    """Return ``value`` in SI units of ``kind`` (see :data:`UNIT_KINDS`).

    Bare numbers are taken as already SI.  Bit rates are accepted where byte rates
    are expected (network links are sold in Gb/s) and divided by eight.
    """
    if isinstance(value, bool):
        raise UnitError(f"expected a number with a unit of {kind}, got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    match = _PATTERN.match(str(value))
    if not match:
        raise UnitError(f"cannot read {value!r} as a number with a unit of {kind}")
    number, unit = float(match.group(1)), match.group(2)
    if not unit:
        return number
    if kind == "seconds":
        if unit in _TIME:
            return number * _TIME[unit]
        raise UnitError(f"unit {unit!r} is not a time; use one of {sorted(_TIME)}")
    suffixes = UNIT_KINDS[kind] + (UNIT_KINDS["bits_per_s"] if kind == "bytes_per_s" else ())
    for suffix in sorted(suffixes, key=len, reverse=True):
        if unit.endswith(suffix):
            prefix = unit[: -len(suffix)]
            scale = _BINARY.get(prefix) or _PREFIX.get(prefix)
            if scale is None:
                break
            if suffix in UNIT_KINDS["bits_per_s"]:
                scale /= 8.0
            return number * scale
    raise UnitError(f"unit {unit!r} is not one of {kind} ({', '.join(suffixes)} with a prefix)")


def format_bytes(n: float) -> str:
    """Human-readable binary size, for tables."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def remainder_s(total: float, *parts: float) -> float:
    """What is left of ``total`` seconds after ``parts`` (a bubble: the step less its busy time),
    never negative, and 0 where only floating-point rounding is left (below 1e-9 of the total)."""
    left = total - sum(parts)
    return left if left > 1e-9 * abs(total) else 0.0
