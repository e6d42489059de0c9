"""The join token and the HMAC challenges keyed by it.

One secret does three jobs: Ray's own token authentication (``RAY_AUTH_MODE=token``), the agent's
mutual challenge (a device proves a head before it joins, a head proves a device before it lists the
cluster), and a fingerprint in the zeroconf advert so a device picks the right cluster.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Final


import hmac

from .state import LanError, NotARegularFile, atomic_write, default_token_path, read_bounded


TOKEN_MIN: Final = 16


TOKEN_MAX: Final = 4096


@dataclass(frozen=True)
class Token:
    """A loaded token, where it came from, and what the user should be told about it."""

    path: Path
    value: bytes
    created: bool = False
    warning: str | None = None

    @property
    def fingerprint(self) -> str:
        return token_fingerprint(self.value)


def load_token(path: Path) -> Token:
    """Read and check a token file; :class:`LanError` (code 2) names the file and the fix.

    A token must be 16..4096 printable ASCII characters with no spaces (Ray sends it in an HTTP
    header); surrounding whitespace (a trailing newline) is ignored. A file others may read is
    used, with a warning.
    """
    path = Path(path).expanduser()
    try:
        raw, st = read_bounded(path, TOKEN_MAX)
    except NotARegularFile:
        raise LanError(f"token file {path} is not a regular file; give the file copied from the head") from None
    except FileNotFoundError:
        raise LanError(f"token file {path} does not exist; copy the head's token file to this device "
                       "(`tilefleet head` prints where it is) or pass --token-file") from None
    except PermissionError:
        raise LanError(f"token file {path} cannot be read (permission denied); run as its owner "
                       "or fix its permissions (chmod 600)") from None
    except OSError as e:
        raise LanError(f"token file {path} cannot be read ({e.strerror or e})") from None
    value = raw.strip()
    if not value:
        raise LanError(f"token file {path} is empty; copy the head's token file to this device")
    if len(raw) > TOKEN_MAX or len(value) < TOKEN_MIN or not all(0x21 <= b <= 0x7E for b in value):
        raise LanError(f"token file {path} does not hold a token: one is {TOKEN_MIN}..{TOKEN_MAX} printable "
                       "ASCII characters without spaces (`tilefleet head` generates one)")
    warning = None
    if st.st_mode & 0o004:
        warning = (f"warning: token file {path} is readable by every user of this machine; "
                   f"anyone who reads it can join and run code on the cluster (chmod 600 {path})")
    return Token(path, value, warning=warning)


def create_token(path: Path) -> Token:
    """Generate a 256-bit token and write it atomically, mode 0600 in a 0700 directory."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = secrets.token_hex(32).encode()
    atomic_write(path, value)
    return Token(path, value, created=True)


def resolve_token(token_file: str | None, *, create: bool) -> Token:
    """The token to use: ``token_file`` if given (it must exist), else the default path, created
    if ``create`` (the head) and missing; a device without one gets a message saying to copy it."""
    if token_file:
        return load_token(Path(token_file))
    path = default_token_path()
    if not path.exists() and create:
        return create_token(path)
    return load_token(path)


def _check_token(token: bytes) -> None:
    if not isinstance(token, (bytes, bytearray)) or not token:
        raise ValueError("the join token must be non-empty bytes")


def token_fingerprint(token: bytes) -> str:
    """16 hex chars naming a token without revealing it, so a device can pick the right head.

    Domain-separated (a fixed prefix) so the digest is useless as a plain SHA-256 of the token
    elsewhere; 64 bits tell tokens apart but are far too short to replace the challenge.
    """
    _check_token(token)
    return hashlib.sha256(_FINGERPRINT_LABEL + bytes(token)).hexdigest()[:16]


def new_nonce() -> bytes:
    """A fresh 32-byte challenge nonce; never reuse one, or an old answer could be replayed."""
    return secrets.token_bytes(32)


def _check_nonce(nonce: bytes) -> None:
    if not isinstance(nonce, (bytes, bytearray)) or not NONCE_MIN <= len(nonce) <= NONCE_MAX:
        raise ValueError(f"the challenge nonce must be {NONCE_MIN}..{NONCE_MAX} bytes (use new_nonce())")


def challenge_response(token: bytes, nonce: bytes) -> bytes:
    """The head's proof that it holds ``token``: HMAC-SHA256(token, label || nonce).

    The joiner sends a fresh nonce and checks this answer before revealing anything, so a rogue
    advert (which can copy the fingerprint) cannot collect devices. The label keeps these MACs
    apart from any other use of the token; a mutual (device-to-head) proof must use its own label,
    or a rogue head could reflect a device's challenge back at it.
    """
    _check_token(token)
    _check_nonce(nonce)
    return hmac.new(bytes(token), _CHALLENGE_LABEL + bytes(nonce), hashlib.sha256).digest()


def verify_response(token: bytes, nonce: bytes, response: bytes) -> bool:
    """Whether ``response`` answers ``nonce`` for ``token``, compared in constant time."""
    if not isinstance(response, (bytes, bytearray)):
        return False
    return hmac.compare_digest(challenge_response(token, nonce), bytes(response))


def device_response(token: bytes, nonce: bytes) -> bytes:
    """The device's proof that it holds ``token``: HMAC-SHA256(token, DEVICE_LABEL || nonce).

    Sent only after the head has proved itself, in answer to the head's own fresh nonce; gates
    the agent's privileged operations (the device list, the link probes).
    """
    _check_token(token)
    _check_nonce(nonce)
    return hmac.new(bytes(token), DEVICE_LABEL + bytes(nonce), hashlib.sha256).digest()


def verify_device_response(token: bytes, nonce: bytes, response: bytes) -> bool:
    """Whether ``response`` is a device's proof for ``nonce`` and ``token`` (constant time)."""
    if not isinstance(response, (bytes, bytearray)):
        return False
    return hmac.compare_digest(device_response(token, nonce), bytes(response))


def certificate_mac(token: bytes, csr: bytes, cert: bytes, ca: bytes) -> bytes:
    """The head's seal on a certificate it issued: HMAC-SHA256(token, CERT_LABEL || sha256 of the
    request, the certificate and the CA). The agent's connection is authenticated at its start but
    not encrypted; the seal stops anyone on the path from swapping the CA or the certificate."""
    _check_token(token)
    digests = b"".join(hashlib.sha256(bytes(x)).digest() for x in (csr, cert, ca))
    return hmac.new(bytes(token), _CERT_LABEL + digests, hashlib.sha256).digest()


def verify_certificate_mac(token: bytes, csr: bytes, cert: bytes, ca: bytes, mac: object) -> bool:
    if not isinstance(mac, (bytes, bytearray)):
        return False
    return hmac.compare_digest(certificate_mac(token, csr, cert, ca), bytes(mac))


_CERT_LABEL: Final = b"tilefleet-certificate-v1\x00"


_FINGERPRINT_LABEL: Final = b"tilefleet-fingerprint-v1\x00"


_CHALLENGE_LABEL: Final = b"tilefleet-join-challenge-v1\x00"


DEVICE_LABEL: Final = b"tilefleet-device-proof-v1\x00"
"""Label of the device-to-head proof (:func:`device_response`), distinct from the head's, so
neither side can reflect the other's challenge back at it."""


NONCE_MIN: Final = 16


NONCE_MAX: Final = 1024
