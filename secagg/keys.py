"""Key agreement, key derivation and share encryption.

X25519 (about 128-bit security) gives each pair of departments a shared secret;
HKDF-SHA256 turns it into the pair key ``K_uv`` and everything derived from it,
each use under its own label so that no two uses ever share a key; shares travel
under ChaCha20-Poly1305 (256-bit keys, random 96-bit nonces, each key used for a
handful of messages only).
"""

from __future__ import annotations

import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .encoding import encode
from .errors import ProtocolViolation

PUBLIC_KEY_BYTES = 32
KEY_BYTES = 32
NONCE_BYTES = 12

# One label per use of HKDF: a derived key is never valid for another purpose.
PAIR_KEY_LABEL = "fedsilo-secagg/pair-key/v1"
SHARE_KEY_LABEL = "fedsilo-secagg/share-key/v1"
PAIR_MASK_LABEL = "fedsilo-secagg/pair-mask/v1"
SELF_MASK_LABEL = "fedsilo-secagg/self-mask/v1"
SHARES_AD_LABEL = "fedsilo-secagg/shares/v1"


def hkdf(key_material: bytes, info: bytes, salt: bytes | None = None, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(key_material)


def new_key_pair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair, the public half as its 32 raw bytes."""
    private = X25519PrivateKey.generate()
    return private, public_bytes(private)


def public_bytes(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def pair_key(private: X25519PrivateKey, peer_public: bytes, session_id: bytes, context: bytes,
             me: str, peer: str) -> bytes:
    """``K_uv = HKDF(X25519(sk_u, pk_v), salt=session id, info=label || context || sorted(u, v))``.

    Symmetric in ``me`` and ``peer``.  A low-order peer key (shared secret all
    zeros) is refused: it would give a key the coordinator can compute.
    """
    try:
        secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise ProtocolViolation(f"the X25519 key of '{peer}' gives no usable shared secret") from None
    if secrets.compare_digest(secret, bytes(len(secret))):
        raise ProtocolViolation(f"the X25519 key of '{peer}' gives no usable shared secret")
    return hkdf(secret, encode(PAIR_KEY_LABEL, context, sorted((me, peer))), salt=session_id)


def pair_seed(key: bytes, round_number: int, context: bytes) -> bytes:
    """``seed_uv,r = HKDF(K_uv, info=label || r || context)``: one ChaCha20 key per pair and round."""
    return hkdf(key, encode(PAIR_MASK_LABEL, round_number, context))


def self_mask_key(seed: bytes, session_id: bytes, context: bytes, owner: str, round_number: int) -> bytes:
    """The ChaCha20 key expanding a 16-byte self-mask seed ``b_u,r``."""
    return hkdf(seed, encode(SELF_MASK_LABEL, context, owner, round_number), salt=session_id)


def share_key(key: bytes, context: bytes) -> bytes:
    return hkdf(key, encode(SHARE_KEY_LABEL, context))


def shares_associated_data(context: bytes, sender: str, recipient: str, first_round: int, window: int) -> bytes:
    """AD binding a share ciphertext to its session, direction and window: a replay
    from another pair, direction or window fails authentication."""
    return encode(SHARES_AD_LABEL, context, sender, recipient, first_round, window)


def seal(key: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """``nonce || ChaCha20-Poly1305(plaintext)``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, associated_data: bytes, sender: str) -> bytes:
    """The plaintext of :func:`seal`; a ciphertext that does not authenticate is a violation."""
    if len(sealed) < NONCE_BYTES + 16:
        raise ProtocolViolation(f"the share ciphertext from '{sender}' is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], associated_data)
    except InvalidTag:
        raise ProtocolViolation(
            f"the share ciphertext from '{sender}' does not authenticate (tampered, or replayed "
            "from another session, pair or window): the coordinator must resend it unchanged") from None
