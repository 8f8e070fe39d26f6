"""``python -m harden.cli``: the ``harden`` command (what ``torchrun ... -m harden.cli`` runs on every rank)."""

from harden.cli.app import main

main()
