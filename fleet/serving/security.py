"""Access control for both ports: an optional bearer token, optional TLS, and where we may bind.

The rule that matters most is the default: an inference server on a LAN address with no token
lets anyone on the LAN use the devices (and load and unload models), so ``tilefleet serve``
refuses to bind anything but loopback without a token unless ``--insecure`` says so. Health
checks (live, ready) never need the token: load balancers and orchestrators probe them bare.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

# paths (REST) and methods (gRPC) that answer without a token
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
OPEN_RPCS = ("ServerLive", "ServerReady")


class SecurityError(ValueError):
    """A security setting that cannot work; the message says what to give instead."""


@dataclass(frozen=True)
class Security:
    token: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None


def read_token(path: str | os.PathLike[str]) -> str:
    p = Path(path).expanduser()
    try:
        token = p.read_text().strip()
    except OSError as e:
        raise SecurityError(f"cannot read the auth token file {p}: {e.strerror}") from None
    if len(token) < 16:
        raise SecurityError(f"the auth token in {p} is {len(token)} characters; use at least 16 (e.g. "
                            "`python -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE`)")
    return token


def tls_files(cert: str | None, key: str | None) -> tuple[Path | None, Path | None]:
    if (cert is None) != (key is None):
        raise SecurityError("TLS needs both --tls-cert and --tls-key (PEM files), or neither")
    if cert is None or key is None:
        return None, None
    out = []
    for what, f in (("--tls-cert", cert), ("--tls-key", key)):
        p = Path(f).expanduser()
        if not p.is_file():
            raise SecurityError(f"{what} {p} does not exist")
        out.append(p)
    return out[0], out[1]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, token: str | None, insecure: bool) -> str | None:
    """Why serving on ``host`` must not start, or None."""
    if token is not None or insecure or is_loopback(host):
        return None
    return (f"refusing to serve on {host} without an auth token: anyone who can reach it could run and "
            "load models. Give --auth-token-file FILE (clients send 'Authorization: Bearer TOKEN'), bind "
            "--host 127.0.0.1, or pass --insecure if the network is trusted")


def bearer_ok(header: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (constant-time); always True without a token."""
    if token is None:
        return True
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


MISSING_TOKEN = "missing or wrong bearer token: send the header 'Authorization: Bearer <token from the server's " \
                "--auth-token-file>'"
