"""Checks of the arguments every command shares, each a HardenError line naming the flag and its valid range.

The CLI and the Python API call the same checks, so that ``--eps nan`` and ``certify(..., eps=[nan])`` are
refused alike, before any work starts.  Options that belong to one method are that method's to check.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from harden.errors import HardenError


def _number(value: Any, flag: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise HardenError(f"{flag} must be a number, got {value!r:.40}") from None
    value = float(value)
    if not math.isfinite(value):
        raise HardenError(f"{flag} must be a finite number, got {value}")
    return value


def check_eps(value: Any, input_range: tuple[float, float], flag: str = "--eps") -> float:
    """An L-inf radius in input units: 0 < eps <= the width of the input range (beyond it every box is the same)."""
    lo, hi = input_range
    eps = _number(value, flag)
    if not 0.0 < eps <= hi - lo:
        raise HardenError(f"{flag} must lie in (0, {hi - lo:g}] (the width of the input range [{lo:g}, {hi:g}]), "
                          f"got {eps:g}")
    return eps


def check_fpr(value: Any, flag: str = "--fpr") -> float:
    fpr = _number(value, flag)
    if not 0.0 < fpr < 1.0:
        raise HardenError(f"{flag} must lie in (0, 1), got {fpr:g}")
    return fpr


def check_count(value: Any, flag: str, minimum: int = 1, maximum: int | None = None) -> int:
    """A whole number >= minimum (and <= maximum when given)."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise HardenError(f"{flag} must be a whole number, got {value!r:.40}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise HardenError(f"{flag} must be {bound}, got {value}")
    return value


def check_limit(value: Any, flag: str = "--limit") -> int | None:
    return None if value is None else check_count(value, flag, 1)


def check_choice(value: Any, choices: Iterable[str], flag: str) -> str:
    choices = list(choices)
    if value not in choices:
        raise HardenError(f"{flag} must be one of {', '.join(choices)}, got {value!r:.40}")
    return value


def check_key(key: Any, flag: str = "--key") -> str:
    if not isinstance(key, str) or not key.strip():
        raise HardenError(f"{flag} must be a non-empty secret (the masks and randomisation derive from it)")
    return key


def check_device(text: Any, flag: str = "--device") -> str:
    """A device torch knows and this machine has: cpu, or cuda[:N] when CUDA is available (and N exists)."""
    import torch

    if not isinstance(text, str) or not text.strip():
        raise HardenError(f"{flag} must name a device (cpu or cuda)")
    try:
        device = torch.device(text.strip())
    except (RuntimeError, ValueError, TypeError):
        raise HardenError(f"{flag} {text!r:.40} is not a device torch knows; use cpu or cuda[:N]") from None
    if device.type == "cpu":
        return str(device)
    if device.type != "cuda":
        raise HardenError(f"{flag} {text!r:.40}: harden runs on cpu or cuda, not {device.type}")
    if not torch.cuda.is_available():
        raise HardenError(f"{flag} {text}: cuda is not available on this machine (use cpu)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise HardenError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(device)
