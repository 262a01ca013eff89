"""A local certificate authority for the broker's TLS listener and device certificates.

The embedded broker serves ``mqtts://`` with a server certificate signed by a CA
that cityops generates once under its security directory (``ca.crt``/``ca.key``,
mode 0600). The same CA signs device client certificates (``CN`` = device id),
which the TLS listener can require as the device's identity, and a certificate
revocation list (``crl.pem``) names the serial numbers of revoked device
certificates. Operators who run their own PKI configure the CA, server
certificate and key by path instead (see ``docs/security.md``); cityops then
never writes a key.

Keys are ECDSA P-256: small, fast on constrained devices and accepted by
OpenSSL-based brokers and clients alike.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["IssuedCertificate", "LocalCertificateAuthority", "TlsFiles"]

_CA_DAYS = 3650
_LEAF_DAYS = 825  # the longest validity clients still accept for TLS server certificates
_RENEW_BEFORE = dt.timedelta(days=30)
_CRL_DAYS = 3650  # no one republishes it on a schedule: it must not expire under the broker


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A CA bundle plus a certificate and its private key, as PEM files."""

    ca_file: Path
    cert_file: Path
    key_file: Path


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """A client certificate just issued: where it is, and its serial number."""

    cert_file: Path
    key_file: Path
    serial: int


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 (keys, and everything next to them)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_entries(names: Iterable[str]) -> list[x509.GeneralName]:
    entries: list[x509.GeneralName] = []
    for name in sorted(set(names)):
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return entries


class LocalCertificateAuthority:
    """The CA kept in ``directory``: created on first use, then reused.

    Files: ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``, ``crl.pem`` and
    ``clients/{CN}.crt|.key`` for issued client certificates.
    """

    def __init__(self, directory: Path, *, organisation: str = "cityops") -> None:
        self.directory = directory
        self._organisation = organisation

    @property
    def ca_file(self) -> Path:
        """The CA certificate (public: give it to devices)."""
        return self.directory / "ca.crt"

    @property
    def crl_file(self) -> Path:
        """The certificate revocation list the broker checks client certificates against."""
        return self.directory / "crl.pem"

    def ensure(self) -> None:
        """Create the CA key and certificate and an empty CRL unless they exist."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not (self.ca_file.exists() and self._ca_key_file.exists()):
            self._create_ca()
        if not self.crl_file.exists():
            self.write_crl(())

    def ensure_server_certificate(self, names: Iterable[str]) -> TlsFiles:
        """A server certificate valid for every name in ``names``; reissued when needed.

        Reissued when missing, expiring within 30 days, not signed by this CA, or
        when a name was added (a host name or address a device connects to).
        """
        self.ensure()
        wanted = set(names)
        cert_file, key_file = self.directory / "server.crt", self.directory / "server.key"
        if not self._server_cert_covers(cert_file, key_file, wanted):
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self._sign(
                subject_cn=f"{self._organisation} broker",
                public_key=key.public_key(),
                days=_LEAF_DAYS,
                usage=ExtendedKeyUsageOID.SERVER_AUTH,
                san=_san_entries(wanted),
            )
            _write_private(key_file, _key_pem(key))
            _write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return TlsFiles(ca_file=self.ca_file, cert_file=cert_file, key_file=key_file)

    def issue_client_certificate(self, common_name: str) -> IssuedCertificate:
        """Issue a client certificate and key with ``CN=common_name`` (replacing any)."""
        self.ensure()
        clients = self.directory / "clients"
        clients.mkdir(mode=0o700, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(
            subject_cn=common_name,
            public_key=key.public_key(),
            days=_LEAF_DAYS,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH,
            san=[],
        )
        cert_file, key_file = clients / f"{common_name}.crt", clients / f"{common_name}.key"
        _write_private(key_file, _key_pem(key))
        _write_private(cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return IssuedCertificate(cert_file=cert_file, key_file=key_file, serial=cert.serial_number)

    def write_crl(self, revoked_serials: Iterable[int]) -> None:
        """Rewrite ``crl.pem`` so that it lists exactly ``revoked_serials``."""
        ca_cert, ca_key = self._load_ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=_CRL_DAYS))
        )
        for serial in sorted(set(revoked_serials)):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(serial)
                .revocation_date(now - dt.timedelta(minutes=5))
                .build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        _write_private(self.crl_file, crl.public_bytes(serialization.Encoding.PEM))

    # -------------------------------------------------------------- internals

    @property
    def _ca_key_file(self) -> Path:
        return self.directory / "ca.key"

    def _create_ca(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self._organisation),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{self._organisation} local CA"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self._ca_key_file, _key_pem(key))
        _write_private(self.ca_file, cert.public_bytes(serialization.Encoding.PEM))
        # The CA certificate is public; a device installer may read it.
        os.chmod(self.ca_file, 0o644)

    def _load_ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        key = serialization.load_pem_private_key(self._ca_key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            msg = f"{self._ca_key_file} is not an EC private key"
            raise TypeError(msg)
        return cert, key

    def _sign(
        self,
        *,
        subject_cn: str,
        public_key: ec.EllipticCurvePublicKey,
        days: int,
        usage: x509.ObjectIdentifier,
        san: list[x509.GeneralName],
    ) -> x509.Certificate:
        ca_cert, ca_key = self._load_ca()
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def _server_cert_covers(self, cert_file: Path, key_file: Path, names: set[str]) -> bool:
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
            ca_cert = x509.load_pem_x509_certificate(self.ca_file.read_bytes())
        except (OSError, ValueError):
            return False
        if not key_file.exists() or cert.issuer != ca_cert.subject:
            return False
        try:
            cert.verify_directly_issued_by(ca_cert)
        except (InvalidSignature, ValueError, TypeError):
            return False
        if cert.not_valid_after_utc - _now() < _RENEW_BEFORE:
            return False
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            return False
        have = {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
        have |= set(san.get_values_for_type(x509.DNSName))
        return names <= have
