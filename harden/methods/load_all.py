"""Importing this module registers every built-in method."""

from harden.methods import ctt  # noqa: F401
