"""Interval bound propagation: Interval, one rule per canonical op (one small file per family), propagate."""

from harden.bounds.interval import Interval
from harden.bounds.rules import BOUND_RULES, Call
from harden.bounds.propagate import BoundResult, check_supported, propagate, run_recorded, supported

__all__ = ["BOUND_RULES", "BoundResult", "Call", "Interval", "check_supported", "propagate", "run_recorded",
           "supported"]
