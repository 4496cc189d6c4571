"""Certificates and keys for a fedsilo deployment, made with ``cryptography``.

Layout of a certificate folder::

    ca.crt                    the enterprise federation CA (give to every department)
    ca.key                    its private key (0600; keep offline after setup)
    coordinator.crt/.key      the coordinator's TLS certificate and key (0600)
    departments/NAME          a department's identity: EC P-384 private key, OpenSSH (0600)
    departments/NAME.pub      its public key, OpenSSH: what the coordinator registers

Private keys are written with mode 0600, never overwritten without ``force``,
and git-ignored.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.shared.signing import generate_identity, write_file

DEFAULT_DAYS = 365
ALWAYS_SANS = ("127.0.0.1", "localhost")  # the SuperLink connects to itself
DEPARTMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class CertError(ValueError):
    """A certificate or key is missing, expired, mismatched or would be overwritten."""


@dataclass(frozen=True)
class CertPaths:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def coordinator_cert(self) -> Path:
        return self.root / "coordinator.crt"

    @property
    def coordinator_key(self) -> Path:
        return self.root / "coordinator.key"

    @property
    def departments(self) -> Path:
        return self.root / "departments"

    def department_key(self, name: str) -> Path:
        return self.departments / name

    def department_public(self, name: str) -> Path:
        return self.departments / f"{name}.pub"


# ----------------------------------------------------------------------------- writing


def _write(path: Path, data: bytes, *, private: bool, force: bool) -> None:
    """Create ``path``; private files get 0600 from the moment they exist."""
    if path.exists() and not force:
        raise CertError(f"'{path}' already exists; pass --force to replace it")
    write_file(path, data, private)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        if not re.match(r"^[A-Za-z0-9*]([A-Za-z0-9.*-]{0,252})$", name):
            raise CertError(f"'{name}' is neither an IP address nor a DNS name") from None
        return x509.DNSName(name)


def init(out: Path | str, sans: list[str] | tuple[str, ...] = (), days: int = DEFAULT_DAYS, force: bool = False) -> CertPaths:
    """Create the CA and the coordinator's certificate (SANs + 127.0.0.1 + localhost)."""
    if days < 1:
        raise CertError("days must be at least 1")
    paths = CertPaths(Path(out))
    existing = [p for p in (paths.ca_key, paths.ca_cert, paths.coordinator_key, paths.coordinator_cert) if p.exists()]
    if existing and not force:
        raise CertError(
            f"{', '.join(map(str, existing))} already exist; pass --force to replace them "
            "(every department would then need the new ca.crt)"
        )
    names = list(dict.fromkeys([*sans, *ALWAYS_SANS]))
    san = x509.SubjectAlternativeName([_san_entry(n) for n in names])
    now = _now()

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedsilo federation CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(paths.ca_key, _pem_key(ca_key), private=True, force=force)
    _write(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    _write(paths.coordinator_key, _pem_key(server_key), private=True, force=force)
    _write(paths.coordinator_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False, force=force)
    paths.departments.mkdir(exist_ok=True)
    return paths


def add_department(name: str, directory: Path | str, force: bool = False) -> tuple[Path, Path]:
    """Create a department's EC P-384 identity key pair in OpenSSH format."""
    if not DEPARTMENT_NAME.match(name):
        raise CertError(
            f"department name '{name}' must be 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    paths = CertPaths(Path(directory))
    private, public = paths.department_key(name), paths.department_public(name)
    for path in (private, public):
        if path.exists() and not force:
            raise CertError(f"'{path}' already exists; pass --force to replace department '{name}'")
    generate_identity(private, public, f"fedsilo-{name}", force=True)
    return private, public


# ----------------------------------------------------------------------------- reading


def load_certificate(path: Path | str) -> x509.Certificate:
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise CertError(f"certificate '{path}' does not exist") from None
    except ValueError as err:
        raise CertError(f"'{path}' is not a PEM certificate ({err})") from None


def load_department_key(path: Path | str) -> ec.EllipticCurvePrivateKey:
    """A department's OpenSSH private key, checked to be EC P-384."""
    path = Path(path)
    try:
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"department key '{path}' does not exist") from None
    except PermissionError:
        raise CertError(f"department key '{path}' is not readable by this user") from None
    except (ValueError, TypeError) as err:
        raise CertError(
            f"'{path}' is not an unencrypted OpenSSH private key ({err}); "
            "create one with `fedsilo certs add-department`"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise CertError(f"'{path}' must be an EC P-384 key (Flower's SuperNode authentication)")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CertError(f"department key '{path}' has mode {oct(mode)}; restrict it with chmod 600")
    return key


def verify_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
        return True
    except (ValueError, TypeError, InvalidSignature):
        return False


def check_coordinator(directory: Path | str) -> None:
    """Raise :class:`CertError` if the coordinator's TLS material would not work."""
    paths = CertPaths(Path(directory))
    ca = load_certificate(paths.ca_cert)
    cert = load_certificate(paths.coordinator_cert)
    now = _now()
    for label, c in (("CA certificate", ca), ("coordinator certificate", cert)):
        if c.not_valid_after_utc < now:
            raise CertError(f"the {label} expired on {c.not_valid_after_utc:%Y-%m-%d}; run `fedsilo certs init --force`")
        if c.not_valid_before_utc > now:
            raise CertError(f"the {label} is not valid before {c.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check the clock")
    if not verify_issued_by(cert, ca):
        raise CertError(f"'{paths.coordinator_cert}' was not issued by '{paths.ca_cert}'")
    try:
        key = serialization.load_pem_private_key(paths.coordinator_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise CertError(f"coordinator key '{paths.coordinator_key}' does not exist") from None
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise CertError(f"'{paths.coordinator_key}' does not match '{paths.coordinator_cert}'")


def describe(directory: Path | str) -> list[dict]:
    """What exists in a certificate folder, with expiry and status, for `certs show`."""
    paths = CertPaths(Path(directory))
    rows: list[dict] = []
    ca = None
    if paths.ca_cert.exists():
        ca = load_certificate(paths.ca_cert)
    for label, path in (("CA", paths.ca_cert), ("coordinator", paths.coordinator_cert)):
        if not path.exists():
            rows.append({"item": label, "path": str(path), "expires": "-", "status": "missing"})
            continue
        cert = load_certificate(path)
        status = "ok"
        if cert.not_valid_after_utc < _now():
            status = "EXPIRED"
        elif ca is not None and label == "coordinator" and not verify_issued_by(cert, ca):
            status = "NOT ISSUED BY ca.crt"
        names = ""
        if label == "coordinator":
            try:
                sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                names = ", ".join(str(v.value) for v in sans)
            except x509.ExtensionNotFound:
                names = ""
        rows.append(
            {"item": label, "path": str(path), "expires": f"{cert.not_valid_after_utc:%Y-%m-%d}", "status": status, "names": names}
        )
    if paths.departments.exists():
        for pub in sorted(paths.departments.glob("*.pub")):
            name = pub.name[: -len(".pub")]
            private = paths.department_key(name)
            status = "ok" if private.exists() else "public key only"
            rows.append({"item": f"department {name}", "path": str(pub), "expires": "-", "status": status})
    return rows
