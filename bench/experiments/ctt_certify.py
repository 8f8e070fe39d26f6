"""`harden certify` with the trap thresholds a scaled CTT head alarms at (T_j + shift * s_j).

    .venv/bin/python -m bench.experiments.ctt_certify out/ctt-strict.hardened --eps 0.003

``harden.api.ctt_traps`` adds the calibrated shift to every trap alike, which is right for unscaled heads only;
until it reads ``TrapHead.alarm_thresholds`` (same for unscaled heads), this wrapper substitutes a version that
does and then runs the ordinary CLI.
"""

from __future__ import annotations

import sys

import harden.api as api


def ctt_traps(hardened):
    from harden.certification import Trap

    traps = []
    for method in hardened.methods:
        if not method.name.startswith("ctt-"):
            continue
        shift = float(hardened.facts["thresholds"][method.name])
        for i, site in enumerate(method.sites):
            indices, _ = method.head.trap(i)
            traps.append(Trap(site, indices.clone(), method.head.alarm_thresholds(i, shift).clone()))
    return traps


if __name__ == "__main__":
    api.ctt_traps = ctt_traps
    from harden.cli.app import main

    sys.argv = ["harden", "certify", *sys.argv[1:]]
    main()
