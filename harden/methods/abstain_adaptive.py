"""The abstain detector's adaptive surrogate: the head itself, differentiable as it is.

raw = z_abs - max_k z_k is piecewise linear in the classifier's values (the max picks the top class; its gradient
is the top class's), so the smoothed score and the exact one are the same function.  Nothing of the abstain
detector is keyed (its weights are trained and shipped), so the key-unknown attacker is the key-known one.
"""

from __future__ import annotations

from harden.methods.abstain import NAME
from harden.methods.surrogates import HeadSurrogate, register_surrogate

# the head reads the logits layer's input, then the logits
register_surrogate(NAME)(HeadSurrogate)
