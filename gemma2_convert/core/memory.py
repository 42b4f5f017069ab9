"""How much memory the machine has free, and when a model is small enough to keep in it."""

from __future__ import annotations

import os

RESIDENT_FRACTION = 0.5
"""Keep weights in RAM when their compute-dtype size is below this share of the available memory."""


def available_memory() -> int:
    """Bytes of physical memory currently available (MemAvailable), or total RAM as a fallback."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fits_resident(nbytes: int) -> bool:
    """True when ``nbytes`` of weights fit comfortably (under ``RESIDENT_FRACTION`` of what is available)."""
    return nbytes < RESIDENT_FRACTION * available_memory()
