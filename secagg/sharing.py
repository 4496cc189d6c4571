"""Shamir secret sharing of 16-byte seeds, t of n, over GF(2^128) (pycryptodome).

A department's share index is its 1-based position in the session's sorted,
signed participant list, so every dealer gives a department the same index and
the coordinator knows whose share is whose without being told.
"""

from __future__ import annotations

import hmac

from Crypto.Protocol.SecretSharing import Shamir

from .errors import ProtocolViolation

SEED_BYTES = 16


def split(seed: bytes, threshold: int, count: int) -> dict[int, bytes]:
    """Index (1..count) -> share of ``seed``; any ``threshold`` of them reconstruct it."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"Shamir seeds are {SEED_BYTES} bytes")
    return dict(Shamir.split(threshold, count, seed))


def combine(shares: dict[int, bytes], threshold: int, owner_of: dict[int, str], secret_owner: str) -> bytes:
    """The seed from ``threshold`` of ``shares`` (index -> share); every further share is checked.

    Each extra share replaces one of the first ``threshold`` and must give the same
    seed: a share that does not is a violation naming its holder.  With exactly
    ``threshold`` shares a wrong one cannot be detected (only the sum would be wrong).
    """
    if len(shares) < threshold:
        raise ProtocolViolation(f"{len(shares)} shares of the seed of '{secret_owner}', {threshold} needed")
    indices = sorted(shares)
    base = [(i, shares[i]) for i in indices[:threshold]]
    seed = Shamir.combine(base)
    for extra in indices[threshold:]:
        again = Shamir.combine(base[1:] + [(extra, shares[extra])])
        if not hmac.compare_digest(seed, again):
            holders = ", ".join(owner_of[i] for i, _ in base)
            raise ProtocolViolation(
                f"the share of the seed of '{secret_owner}' revealed by '{owner_of[extra]}' disagrees with "
                f"those of {holders}: one of them lies")
    return seed
