"""Byte counts as people write and read them: ``5GB`` → 5·10⁹, 5.2e9 → ``5.2 GB``."""

from __future__ import annotations

import re


def parse_size(s: str | int) -> int:
    """'5GB', '500MB', '2GiB', or a byte count → bytes (ValueError names the accepted forms)."""
    if isinstance(s, int):
        return s
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot parse size {s!r}; use e.g. 5GB, 500MB or a byte count")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def human_bytes(n: float) -> str:
    """Decimal units, one decimal place: ``1.2 GB``; whole bytes below 1 kB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
