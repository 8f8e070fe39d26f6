"""The attacks ``harden evaluate`` and ``harden report`` run when none are named (a light module: the CLI's help
text reads it without importing torch)."""

DEFAULT_ATTACKS = ("fgsm:eps=0.1", "pgd:eps=0.1", "bim:eps=0.1", "deepfool", "cw")
