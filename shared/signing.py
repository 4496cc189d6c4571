"""Signatures for ledger entries: EC P-384 keys in OpenSSH format, ECDSA-SHA384.

In a deployment a department signs with the same key that is its identity at
the coordinator; in a simulation each department gets a key generated beside
its ledger.  Verification needs only the public key (``NAME.pub``).
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import safe_read


class SigningKeyError(ValueError):
    """A key file is missing, unreadable or of the wrong kind."""


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """``SHA256:<base64>`` of the OpenSSH public key blob, as ``ssh-keygen -l`` shows."""
    line = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    blob = base64.b64decode(line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


class Signer:
    """Signs ledger entries with one department's private key."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or private_key.curve.name != "secp384r1":
            raise SigningKeyError("ledger signing keys must be EC P-384")
        self._key = private_key
        self.public_key = private_key.public_key()
        self.fingerprint = fingerprint(self.public_key)

    def sign(self, payload: bytes) -> str:
        return base64.b64encode(self._key.sign(payload, ec.ECDSA(hashes.SHA384()))).decode()

    @classmethod
    def from_file(cls, path: Path | str) -> "Signer":
        path = Path(path)
        try:
            data = safe_read.read_bytes(path, safe_read.MAX_KEY_BYTES, "signing key")
        except safe_read.UnreadableFile as err:
            raise SigningKeyError(f"cannot read signing key {err}") from None
        try:
            key = serialization.load_ssh_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError) as err:
                raise SigningKeyError(f"'{path}' is not an unencrypted EC private key ({err})") from None
        return cls(key)  # type: ignore[arg-type]


def verify(public_key: ec.EllipticCurvePublicKey, payload: bytes, signature: str) -> bool:
    try:
        public_key.verify(base64.b64decode(signature, validate=True), payload, ec.ECDSA(hashes.SHA384()))
        return True
    except (InvalidSignature, ValueError):
        return False


def load_public_key(path: Path | str) -> ec.EllipticCurvePublicKey:
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(safe_read.read_bytes(path, safe_read.MAX_KEY_BYTES, "public key"))
    except safe_read.UnreadableFile as err:
        raise SigningKeyError(f"cannot read public key {err}") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SigningKeyError(f"'{path}' is not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SigningKeyError(f"'{path}' is not an EC public key")
    return key


def generate_identity(private_path: Path, public_path: Path, comment: str, force: bool = False) -> None:
    """A new EC P-384 key pair: OpenSSH private key (0600 from creation) and public key.

    Without ``force`` the private key appears atomically and only if absent, so
    two processes racing to create one identity end up sharing a single key.
    """
    for path in (private_path, public_path):
        if path.exists() and not force:
            raise FileExistsError(f"'{path}' already exists; pass --force to replace it")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if force:
        write_file(private_path, private, private=True)
    else:
        staging = private_path.with_name(f".{private_path.name}.{os.getpid()}.tmp")
        write_file(staging, private, private=True)
        try:
            os.link(staging, private_path)  # fails if another process got there first
        finally:
            staging.unlink()
    write_file(public_path, public + f" {comment}\n".encode(), private=False)


def write_file(path: Path, data: bytes, private: bool) -> None:
    """Write ``data``; a private file is 0600 from the moment it exists, in a folder created 0700."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o777)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600 if private else 0o644)


def simulated_identity(ledger_dir: Path, department: str) -> Signer:
    """The signing key a simulated department keeps beside its ledger (created once)."""
    private, public = Path(ledger_dir) / f"{department}.key", Path(ledger_dir) / f"{department}.pub"
    if not private.exists():
        try:
            generate_identity(private, public, f"fedsilo-simulated-{department}")
        except FileExistsError:
            pass  # another process created it first
    return Signer.from_file(private)
