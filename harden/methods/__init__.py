"""Detection methods, each registered under its CLI name in ``harden.methods.base.METHODS``."""
