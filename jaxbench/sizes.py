"""Sizes in bytes, read from and written for people: "24GiB" in, "33.06 GiB" out. No dependencies, so
the service's settings (which the PyWorker reads too) can parse them."""

from __future__ import annotations

import re

GiB = 2**30
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """Bytes from "24GiB", "24 GB", "512MiB" or a plain number of bytes; ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match and _UNITS.get(match.group(2).lower())
    if not unit:
        raise ValueError(f"{text!r:.40} is not a size (e.g. 24GiB, 24000MB, or bytes)")
    size = int(float(match.group(1)) * unit)
    if size <= 0:
        raise ValueError(f"{text!r:.40} is not a positive size")
    return size


def format_size(n: int) -> str:
    """Bytes in the largest binary unit that keeps a digit before the point ("33.06 GiB", "612.50 KiB")."""
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"
