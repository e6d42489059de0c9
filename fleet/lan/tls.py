"""TLS for Ray's traffic: the head's certificate authority, device certificates, Ray's environment.

Why a CA of our own: Ray's gRPC channels take one CA file and one certificate and key per process
(``RAY_USE_TLS``, ``RAY_TLS_CA_CERT``, ``RAY_TLS_SERVER_CERT``, ``RAY_TLS_SERVER_KEY``), used both to
serve and to call, so every node needs a certificate the others accept, valid for the address it
serves on. ``tilefleet head --tls`` makes a CA once (kept in the head's state dir, 0600 in 0700;
the CA key never leaves it), and signs a certificate for each device *after* the agent's mutual
HMAC challenge: the device makes its key itself and sends only a certificate signing request
(CSR); the head checks it and signs it for the address the request came from.

What is checked in a CSR (untrusted input from the network): its size, that it parses and that
its signature is valid (the requester holds the key), the key type and size, and that every
address it asks for is the requester's own address or a loopback one; the subject is set by the
head, not taken from the request. Certificates a device receives are checked against the CA and
its own key before they are written. Every PEM file is read with a size limit.

Pure functions (``make_ca``, ``make_csr``, ``sign_csr``, ``check_issued``) do the work on bytes;
``head_files`` and ``device_files`` put them on disk with owner-only modes.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from .state import LanError, NotARegularFile, atomic_write, read_bounded

PEM_MAX: Final = 16 * 1024
"""Largest PEM (key, certificate, CSR) read from disk or the network: ours are under 1 KiB."""
CA_DAYS: Final = 3650
CERT_DAYS: Final = 397
RENEW_DAYS: Final = 30
"""A head certificate with less than this left is made again at start."""
LOOPBACK_NAMES: Final = ("127.0.0.1", "localhost")
"""Every certificate also names these: a node's own processes reach it through them."""
TLS_ENV: Final = ("RAY_USE_TLS", "RAY_TLS_SERVER_CERT", "RAY_TLS_SERVER_KEY", "RAY_TLS_CA_CERT")


class TlsError(LanError, ValueError):
    """A key, certificate or request is missing, malformed or not acceptable; says which and why."""


@dataclass(frozen=True)
class TlsFiles:
    """The three files a Ray process needs for TLS."""

    ca_cert: Path
    cert: Path
    key: Path

    def env(self) -> dict[str, str]:
        return {"RAY_USE_TLS": "1", "RAY_TLS_SERVER_CERT": str(self.cert), "RAY_TLS_SERVER_KEY": str(self.key),
                "RAY_TLS_CA_CERT": str(self.ca_cert)}


def tls_env(base: Mapping[str, str], files: TlsFiles | None) -> dict[str, str]:
    """``base`` with Ray's TLS variables set (``files``) or removed and TLS off (None)."""
    env = {k: v for k, v in base.items() if k not in TLS_ENV}
    if files is None:
        env["RAY_USE_TLS"] = "0"
    else:
        env.update(files.env())
    return env


# --------------------------------------------------------------------------------------------------
# Pure: keys, the CA, requests, signing, checks (bytes in, bytes out)
# --------------------------------------------------------------------------------------------------


def _x509() -> Any:
    try:
        from cryptography import x509
    except ImportError:  # pragma: no cover - cryptography is a declared dependency
        raise TlsError("TLS needs the `cryptography` package: pip install cryptography") from None
    return x509


def new_key_pem() -> bytes:
    """A fresh P-256 private key (PEM, unencrypted: Ray reads the file as it is; its mode protects it)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(pem: bytes) -> Any:
    from cryptography.hazmat.primitives import serialization

    _check_size(pem, "private key")
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise TlsError(f"not a PEM private key ({str(e)[:120]})") from None


def _load_cert(pem: bytes, what: str = "certificate") -> Any:
    _check_size(pem, what)
    try:
        return _x509().load_pem_x509_certificate(pem)
    except ValueError as e:
        raise TlsError(f"the {what} is not a PEM certificate ({str(e)[:120]})") from None


def _check_size(pem: object, what: str) -> None:
    if not isinstance(pem, (bytes, bytearray)):
        raise TlsError(f"the {what} must be bytes, got {type(pem).__name__}")
    if not 0 < len(pem) <= PEM_MAX:
        raise TlsError(f"the {what} is {len(pem)} bytes; a PEM here is 1..{PEM_MAX} bytes")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _names(ips: list[str]) -> Any:
    """Subject alternative names: each address as an IP (and as text, which older gRPC matches),
    plus the loopback names."""
    x509 = _x509()
    entries: list[Any] = []
    for text in [*ips, *LOOPBACK_NAMES]:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            entry = x509.DNSName(text)
            if entry not in entries:
                entries.append(entry)
            continue
        for entry in (x509.IPAddress(ip), x509.DNSName(str(ip))):
            if entry not in entries:
                entries.append(entry)
    return x509.SubjectAlternativeName(entries)


def make_ca(cluster_name: str) -> tuple[bytes, bytes]:
    """(CA certificate PEM, CA key PEM) for a cluster: valid ten years, may sign leaf certificates only."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    x509 = _x509()
    key_pem = new_key_pem()
    key = _load_key(key_pem)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tilefleet CA {cluster_name}"[:64])])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - _dt.timedelta(minutes=5))
            .not_valid_after(now + _dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def make_csr(key_pem: bytes, node_ip: str) -> bytes:
    """A signing request for ``key_pem``'s key, asking for ``node_ip`` (and the loopback names)."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    x509 = _x509()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tilefleet node {node_ip}")]))
           .add_extension(_names([node_ip]), critical=False).sign(_load_key(key_pem), hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


def _requested_names(csr: Any) -> list[str]:
    x509 = _x509()
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in san.get_values_for_type(x509.IPAddress)] + list(san.get_values_for_type(x509.DNSName))


def check_csr(csr_pem: bytes, peer_ip: str) -> Any:
    """The parsed request if the head may sign it for a requester at ``peer_ip``; else :class:`TlsError`."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    _check_size(csr_pem, "signing request")
    try:
        csr = _x509().load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise TlsError(f"the signing request is not a PEM CSR ({str(e)[:120]})") from None
    if not csr.is_signature_valid:
        raise TlsError("the signing request's signature is not valid: it was not made with its own key")
    pub = csr.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.key_size < 256:
            raise TlsError(f"the request's EC key has {pub.curve.key_size} bits; use P-256 or larger")
    elif isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < 2048:
            raise TlsError(f"the request's RSA key has {pub.key_size} bits; use 2048 or more")
    else:
        raise TlsError(f"the request's key is a {type(pub).__name__}; use an EC P-256 or RSA key")
    allowed = {str(ipaddress.ip_address(peer_ip)), *LOOPBACK_NAMES, "::1"}
    names = _requested_names(csr)
    if str(ipaddress.ip_address(peer_ip)) not in names:
        raise TlsError(f"the signing request does not name the requester's address {peer_ip}; "
                       "a certificate is issued for the address the request comes from")
    others = sorted(set(names) - allowed)
    if others:
        raise TlsError(f"the signing request asks for {others}, which are not the requester's address "
                       f"({peer_ip}) or loopback")
    return csr


def sign_csr(ca_cert_pem: bytes, ca_key_pem: bytes, csr_pem: bytes, peer_ip: str, *,
             days: int = CERT_DAYS) -> bytes:
    """A leaf certificate for a request that passes :func:`check_csr`, for ``peer_ip`` only."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    x509 = _x509()
    csr = check_csr(csr_pem, peer_ip)
    ca, ca_key = _load_cert(ca_cert_pem, "CA certificate"), _load_key(ca_key_pem)
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tilefleet node {peer_ip}")]))
            .issuer_name(ca.subject).public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
            .add_extension(_names([str(ipaddress.ip_address(peer_ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                         data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def check_issued(cert_pem: bytes, ca_cert_pem: bytes, key_pem: bytes | None = None,
                 node_ip: str | None = None) -> None:
    """That ``cert_pem`` was signed by the CA, is valid now, holds ``key_pem``'s public key and
    names ``node_ip``; :class:`TlsError` says which check failed."""
    from cryptography.hazmat.primitives import serialization

    cert, ca = _load_cert(cert_pem), _load_cert(ca_cert_pem, "CA certificate")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception as e:  # ValueError, TypeError or InvalidSignature
        raise TlsError(f"the certificate was not issued by the cluster's CA ({type(e).__name__})") from None
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise TlsError(f"the certificate is valid {cert.not_valid_before_utc:%Y-%m-%d} to "
                       f"{cert.not_valid_after_utc:%Y-%m-%d}, not now")
    if key_pem is not None:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        mine = _load_key(key_pem).public_key().public_bytes(serialization.Encoding.DER, spki)
        if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != mine:
            raise TlsError("the certificate is not for this device's key")
    if node_ip is not None and str(ipaddress.ip_address(node_ip)) not in _requested_names(cert):
        raise TlsError(f"the certificate does not name this node's address {node_ip}")


def days_left(cert_pem: bytes) -> float:
    return (_load_cert(cert_pem).not_valid_after_utc - _now()).total_seconds() / 86400


# --------------------------------------------------------------------------------------------------
# Files (owner-only)
# --------------------------------------------------------------------------------------------------


def read_pem(path: Path, what: str) -> bytes:
    """A PEM file, at most :data:`PEM_MAX` bytes, regular and not readable by others if it is a key."""
    try:
        data, st = read_bounded(path, PEM_MAX)
    except NotARegularFile:
        raise TlsError(f"{what} {path} is not a regular file") from None
    except FileNotFoundError:
        raise TlsError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise TlsError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if len(data) > PEM_MAX or b"-----BEGIN " not in data:
        raise TlsError(f"{what} {path} is not a PEM file of at most {PEM_MAX} bytes; remove it to make a new one")
    if path.suffix == ".key" and st.st_mode & 0o077:
        raise TlsError(f"{what} {path} is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 {path}, or "
                       "remove it and its certificate to make new ones")
    return data


def tls_dir(state: Path) -> Path:
    """``<state>/tls`` (0700): the CA (head only) and this machine's certificates."""
    d = Path(state) / "tls"
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(d, 0o700)
    return d


def _write(path: Path, data: bytes) -> None:
    atomic_write(path, data)  # mode 0600 from mkstemp, then a rename


def head_files(state: Path, cluster_name: str, node_ip: str) -> TlsFiles:
    """The head's CA (made once) and its own certificate (made again when missing, for another
    address, expiring, or from another CA)."""
    d = tls_dir(state)
    ca_cert, ca_key = d / "ca.crt", d / "ca.key"
    if not ca_cert.exists() or not ca_key.exists():
        cert_pem, key_pem = make_ca(cluster_name)
        _write(ca_key, key_pem)
        _write(ca_cert, cert_pem)
    ca_pem, ca_key_pem = read_pem(ca_cert, "CA certificate"), read_pem(ca_key, "CA key")
    files = TlsFiles(ca_cert, d / "head.crt", d / "head.key")
    try:
        cert_pem = read_pem(files.cert, "certificate")
        check_issued(cert_pem, ca_pem, read_pem(files.key, "key"), node_ip)
        if days_left(cert_pem) < RENEW_DAYS:
            raise TlsError("expiring")
    except TlsError:
        key_pem = new_key_pem()
        _write(files.key, key_pem)
        _write(files.cert, sign_csr(ca_pem, ca_key_pem, make_csr(key_pem, node_ip), node_ip))
    return files


class Signer:
    """The head's side of ``certify``: sign a device's request with the CA (loaded once)."""

    def __init__(self, state: Path) -> None:
        d = tls_dir(state)
        self.ca_pem = read_pem(d / "ca.crt", "CA certificate")
        self._ca_key = read_pem(d / "ca.key", "CA key")

    def __call__(self, csr_pem: bytes, peer_ip: str) -> tuple[bytes, bytes]:
        """(certificate, CA certificate) for a request from ``peer_ip``; :class:`TlsError` if refused."""
        return sign_csr(self.ca_pem, self._ca_key, csr_pem, peer_ip), self.ca_pem


def device_files(directory: Path, name: str, cert_pem: bytes, ca_pem: bytes, key_pem: bytes,
                 node_ip: str) -> TlsFiles:
    """Check a certificate the head issued, then write it, its key and the CA (0600 in 0700)."""
    check_issued(cert_pem, ca_pem, key_pem, node_ip)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(directory, 0o700)
    files = TlsFiles(directory / f"{name}-ca.crt", directory / f"{name}.crt", directory / f"{name}.key")
    _write(files.key, key_pem)
    _write(files.cert, cert_pem)
    _write(files.ca_cert, ca_pem)
    return files


def obtain(client: Any, token: bytes, directory: Path, name: str, node_ip: str) -> TlsFiles:
    """A certificate for this machine from a ``--tls`` head, over an agent connection whose head
    passed the trust check (``client``: an :class:`~fleet.lan.agent.AgentClient`): a new key made
    here (it never leaves), a request for ``node_ip``, the head's signature, all checked."""
    key_pem = new_key_pem()
    cert_pem, ca_pem = client.certify(make_csr(key_pem, node_ip), token)
    return device_files(directory, name, cert_pem, ca_pem, key_pem, node_ip)


def driver_tls(advert: Any, client: Any, token: Any, node_ip: str, state: Path | None = None) -> TlsFiles | None:
    """A certificate for a Ray driver in this process when ``advert``'s head uses TLS (None when it
    does not): ``fleet.connect(cluster=...)`` calls it with the agent connection of its trust check.
    Kept in ``<state>/tls/driver-<pid>``; those of drivers no longer running are removed."""
    from .procs import pid_alive
    from .state import state_dir

    if not advert.tls:
        return None
    if token is None:
        raise TlsError(f"cluster {advert.cluster_name} uses TLS, which needs the join token; drop insecure=True")
    base = tls_dir(state if state is not None else state_dir())
    for old in base.glob("driver-*"):
        pid = old.name.removeprefix("driver-")
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            for f in old.iterdir():
                f.unlink(missing_ok=True)
            old.rmdir()
    return obtain(client, token.value, base / f"driver-{os.getpid()}", "driver", node_ip)
