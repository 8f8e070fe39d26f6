"""An integrity seal for bundles: an HMAC-SHA256 over every member, keyed with a secret the user holds.

Without a seal a bundle proves only that it is consistent with itself (its graph reproduces its own
recorded outputs): someone who changes a threshold and the recorded outputs together is not caught.  With
``--seal-key`` (or ``HARDEN_SEAL_KEY``) at ``harden instrument``, ``seal.json`` holds an HMAC of every other
member's name and SHA-256; every command given the same key recomputes it before reading anything else
and refuses a bundle that differs in one byte, or that carries no seal.  The key never enters the bundle.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Mapping

from harden.errors import HardenError

SEAL_MEMBER = "seal.json"
ENV_VAR = "HARDEN_SEAL_KEY"
ALGORITHM = "hmac-sha256"


def resolve_key(key: str | None) -> str | None:
    """The seal key given, else ``HARDEN_SEAL_KEY``, else None; an empty key is refused."""
    if key is None:
        key = os.environ.get(ENV_VAR)
        if key is None:
            return None
        source = ENV_VAR
    else:
        source = "--seal-key"
    if not key.strip():
        raise HardenError(f"{source} is empty; give a secret of at least 16 characters, or unset it")
    if len(key) < 16:
        raise HardenError(f"{source} is {len(key)} characters; a seal key needs at least 16 (a random secret)")
    return key


def digest(members: Mapping[str, bytes], key: str) -> str:
    """HMAC over the sorted member names, each with its length and SHA-256 (the seal member excluded)."""
    mac = hmac.new(key.encode("utf-8"), digestmod=hashlib.sha256)
    mac.update(b"harden-bundle-seal-v1")
    for name in sorted(n for n in members if n != SEAL_MEMBER):
        encoded = name.encode("utf-8")
        content = members[name]
        mac.update(len(encoded).to_bytes(8, "little") + encoded)
        mac.update(len(content).to_bytes(8, "little") + hashlib.sha256(content).digest())
    return mac.hexdigest()


def seal_document(members: Mapping[str, bytes], key: str) -> dict:
    return {"algorithm": ALGORITHM, "hmac": digest(members, key)}


def verify(members: Mapping[str, bytes], seal: object, key: str | None, where: str) -> str:
    """'verified', 'unverified' (sealed, no key given) or 'none'; a HardenError when the key disagrees."""
    if key is None:
        return "unverified" if seal is not None else "none"
    if seal is None:
        raise HardenError(f"{where} carries no seal, and a seal key was given: it was not sealed with "
                          "--seal-key, or its seal was removed")
    if not isinstance(seal, dict) or seal.get("algorithm") != ALGORITHM or not isinstance(seal.get("hmac"), str):
        raise HardenError(f"{where}: {SEAL_MEMBER} is malformed")
    if not hmac.compare_digest(seal["hmac"], digest(members, key)):
        raise HardenError(f"{where}: the seal does not match: the bundle changed after it was sealed, or the seal "
                          "key differs")
    return "verified"
