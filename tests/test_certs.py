"""Certificate and key tooling: right formats, right permissions, problems reported."""

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedsilo.certs import authority
from fedsilo.certs.authority import CertError, CertPaths


def test_init_makes_a_ca_and_a_coordinator_certificate_with_the_sans(tmp_path):
    paths = authority.init(tmp_path, ["fl.corp.example", "10.1.2.3"])
    cert = authority.load_certificate(paths.coordinator_cert)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v.value) for v in sans}
    assert {"fl.corp.example", "10.1.2.3", "127.0.0.1", "localhost"} <= names
    assert authority.verify_issued_by(cert, authority.load_certificate(paths.ca_cert))
    for private in (paths.ca_key, paths.coordinator_key):
        assert private.stat().st_mode & 0o777 == 0o600
    authority.check_coordinator(tmp_path)  # consistent material passes


def test_nothing_is_overwritten_without_force(tmp_path):
    authority.init(tmp_path)
    first = (tmp_path / "ca.crt").read_bytes()
    with pytest.raises(CertError, match="--force"):
        authority.init(tmp_path)
    authority.add_department("finance", tmp_path)
    key = (tmp_path / "departments" / "finance").read_bytes()
    with pytest.raises(CertError, match="--force"):
        authority.add_department("finance", tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == first
    assert (tmp_path / "departments" / "finance").read_bytes() == key
    authority.add_department("finance", tmp_path, force=True)
    assert (tmp_path / "departments" / "finance").read_bytes() != key


def test_department_keys_are_p384_openssh_and_private(tmp_path):
    private, public = authority.add_department("hr", tmp_path)
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_text().startswith("-----BEGIN OPENSSH")  # OpenSSH, not PKCS#8
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    key = authority.load_department_key(private)
    assert key.curve.name == "secp384r1"
    loaded_public = serialization.load_ssh_public_key(public.read_bytes())
    assert loaded_public.public_numbers() == key.public_key().public_numbers()
    with pytest.raises(CertError, match="department name"):
        authority.add_department("../evil", tmp_path)


def test_problems_are_reported_before_anything_starts(tmp_path):
    paths = authority.init(tmp_path)
    # a key that does not match the certificate
    good_key = paths.coordinator_key.read_bytes()
    other = ec.generate_private_key(ec.SECP384R1())
    paths.coordinator_key.write_bytes(
        other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    with pytest.raises(CertError, match="does not match"):
        authority.check_coordinator(tmp_path)
    paths.coordinator_key.write_bytes(good_key)

    # an expired certificate, signed by the right CA
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    ca = authority.load_certificate(paths.ca_cert)
    cert = authority.load_certificate(paths.coordinator_cert)
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=30)
    expired = (
        x509.CertificateBuilder().subject_name(cert.subject).issuer_name(ca.subject)
        .public_key(cert.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(past - dt.timedelta(days=1)).not_valid_after(past)
        .sign(ca_key, hashes.SHA384())
    )
    paths.coordinator_cert.write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CertError, match="expired"):
        authority.check_coordinator(tmp_path)
    rows = {row["item"]: row["status"] for row in authority.describe(tmp_path)}
    assert rows["coordinator"] == "EXPIRED"

    # a certificate from another CA
    other_dir = tmp_path / "other"
    authority.init(other_dir)
    CertPaths(tmp_path).coordinator_cert.write_bytes((other_dir / "coordinator.crt").read_bytes())
    CertPaths(tmp_path).coordinator_key.write_bytes((other_dir / "coordinator.key").read_bytes())
    with pytest.raises(CertError, match="not issued by"):
        authority.check_coordinator(tmp_path)


def test_missing_and_unreadable_material_is_named(tmp_path):
    with pytest.raises(CertError, match="does not exist"):
        authority.check_coordinator(tmp_path)
    with pytest.raises(CertError, match="does not exist"):
        authority.load_department_key(tmp_path / "nobody")
    junk = tmp_path / "junk"
    junk.write_text("hello")
    junk.chmod(0o600)
    with pytest.raises(CertError, match="OpenSSH private key"):
        authority.load_department_key(junk)
