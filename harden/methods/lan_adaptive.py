"""LAN's adaptive surrogate: the head itself, which is differentiable already.

The score ``1 - softmax(f2(g(x)))[argmax f1(x)]`` is smooth in ``x`` through g and f2; the classifier's class is
piecewise constant, so the gradient pulls f2 towards whatever class the classifier gives the input at this step
(once the attack has flipped the classifier, towards the new class).  The exact score is the shipped head's.

What is keyed: g's and f2's weights (their initialisation, batch order and noise draws come from the key).  An
attacker without the key trains its own pair on the same classifier and data, which is what a proxy bundle is
(``harden evaluate --adaptive-proxy``: the same classifier instrumented with ``--method lan`` and another key).
"""

from __future__ import annotations

from harden.errors import HardenError
from harden.methods.lan import NAME
from harden.methods.surrogates import KEY_UNKNOWN, HeadSurrogate, Knowledge, register_surrogate


@register_surrogate(NAME)
class LanSurrogate(HeadSurrogate):
    def __init__(self, hardened, method, knowledge: Knowledge):
        if knowledge.attacker == KEY_UNKNOWN:
            raise HardenError("a key-unknown attacker of lan needs its own attention and mask networks: pass "
                              "--adaptive-proxy (the same classifier instrumented with --method lan and another --key)")
        super().__init__(hardened, method, knowledge)
