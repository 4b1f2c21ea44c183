"""Human units for the SDK: memory sizes ("2GiB") and durations ("10m")."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from taskray.errors import InvalidResourcesError, InvalidTaskError

_MEMORY_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_MEMORY_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
_DURATION_RE = re.compile(r"([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_memory(value: int | float | str | None) -> int:
    """Bytes from ``2147483648``, ``"2GiB"``, ``"512MB"`` or ``"1.5 gib"``."""
    if value is None:
        return 0
    if isinstance(value, bool):
        raise InvalidResourcesError(f"memory must be a size, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise InvalidResourcesError(f"memory must be a size >= 0, got {value!r}")
        return int(value)
    match = _MEMORY_RE.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _MEMORY_UNITS:
        raise InvalidResourcesError(f"memory must look like '2GiB' or '512MB', got {value!r}")
    return int(float(match.group(1)) * _MEMORY_UNITS[unit])


def parse_duration(value: int | float | str | timedelta | None) -> float | None:
    """Seconds from ``90``, ``timedelta(minutes=10)``, ``"10m"``, ``"1h30m"`` or ``"500ms"``."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.replace(" ", "").lower()
        parts = _DURATION_RE.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise InvalidTaskError(
                f"a duration must look like '30s', '10m' or '1h30m', got {value!r}"
            )
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    else:
        raise InvalidTaskError(f"a duration must be seconds or a string like '10m', got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidTaskError(f"a duration must be positive, got {value!r}")
    return seconds
