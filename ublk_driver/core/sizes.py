"""Human sizes: ``64M``, ``1G``, ``4096``, ``512K``, ``1GiB``."""

from __future__ import annotations

import re

from ublk_driver.core.errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """Parse a size with an optional binary unit (K, M, G, T; KiB... accepted)."""
    if isinstance(text, int):
        if text < 0:
            raise ConfigError(f"size must not be negative, got {text}")
        return text
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtTbB]?)(?:i?[bB])?\s*", text)
    if not m:
        raise ConfigError(f"not a size: {text!r} (examples: 4096, 512K, 64M, 1G)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def format_size(n: int) -> str:
    for unit, mult in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)
