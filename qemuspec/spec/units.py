"""Sizes and durations as people write them ("256M", "1G", "60s"), normalised to numbers.

Normalising at validation time means two definitions that say the same thing in different words
(`memory = 256` and `memory = "256M"`) are equal models and render the same argv.
"""

from __future__ import annotations

import re

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTkmgt]?)(?:i?[Bb])?\s*$")
_FACTOR = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}

MAX_BYTES = 1 << 60  # 1 EiB: larger is a typo, and beyond what qemu or a disk takes
MAX_SECONDS = (
    7 * 86400.0
)  # a week: longer timeouts are typos (and overflow poll/select after a fork)


def parse_bytes(value: object, bare_unit: str = "") -> int:
    """A size in bytes. A bare number is in ``bare_unit`` ("" for bytes, "M" for MiB)."""
    if isinstance(value, bool):
        raise ValueError("expected a size, got a boolean")
    if isinstance(value, int):
        if value.bit_length() > 70:
            raise ValueError(f"size {str(value)[:20]}... is larger than qemuspec allows (1 EiB)")
        number, unit = float(value), bare_unit
    elif isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(
                f'bad size "{value}": write a number with a unit K, M, G or T, for example "512M" or "2G"'
            )
        number, unit = float(match.group(1)), match.group(2).upper() or bare_unit
    else:
        raise ValueError(f'expected a size such as "512M", got {type(value).__name__}')
    if not number < MAX_BYTES / _FACTOR[unit]:  # also catches inf/nan and 400-digit numbers
        raise ValueError(
            f'size "{value}" is larger than qemuspec allows (1 EiB): check the number and the unit'
        )
    size = int(number * _FACTOR[unit])
    if size <= 0:
        raise ValueError(f'size "{value}" must be greater than zero')
    return size


BARE_MIB_LIMIT = (
    1 << 20
)  # a bare memory number this large (1 TiB in MiB) is a size in bytes written without a unit


def parse_mib(value: object) -> int:
    """Memory: a bare number means MiB, as it does for qemu's -m. One of a TiB or more is almost surely
    bytes (536870912 would be 512 TiB), so it is refused with the spelling that was probably meant."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= BARE_MIB_LIMIT:
        meant = format_bytes(value) if value % (1 << 20) == 0 else f"{value >> 20}M"
        raise ValueError(
            f"memory = {value} is a number of MiB, {format_bytes(value << 20)}iB: did you mean bytes? "
            f'write memory = "{meant}" (a bare number is MiB; add a unit K, M, G or T to be sure)'
        )
    size = parse_bytes(value, bare_unit="M")
    if size % (1 << 20):
        raise ValueError(
            f'memory "{value}" is not a whole number of MiB: use for example "256M" or "1G"'
        )
    return size >> 20


def parse_seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration, got a boolean")
    if isinstance(value, int) and value.bit_length() > 64:
        raise ValueError(f"duration {str(value)[:20]}... is longer than qemuspec allows (a week)")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(
                f'bad duration "{value}": write a number with ms, s, m or h, for example "30s" or "2m"'
            )
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    else:
        raise ValueError(f'expected a duration such as "30s", got {type(value).__name__}')
    if not seconds > 0:  # also nan
        raise ValueError(f'duration "{value}" must be greater than zero')
    if not seconds <= MAX_SECONDS:  # also inf
        raise ValueError(
            f'duration "{value}" is longer than qemuspec allows (a week, 604800 s): check the number and the unit'
        )
    return seconds


def format_bytes(size: int) -> str:
    """The shortest exact spelling with a unit, so written definitions stay readable."""
    for unit in ("T", "G", "M", "K"):
        if size % _FACTOR[unit] == 0:
            return f"{size // _FACTOR[unit]}{unit}"
    return str(size)
