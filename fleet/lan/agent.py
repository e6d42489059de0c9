"""The head's agent: a small TCP service that lets devices judge, authenticate and measure a head.

Why a service of our own next to Ray's: a device must check a head *before* it hands it anything
(Ray's own port wants the token at once), and must measure its link to the head before it joins,
to label itself with that figure. The agent answers, on one TCP port:

- ``info``: the head's advert (what the zeroconf TXT record says), with no authentication, so a
  device given ``--address`` learns what a browsing device would;
- ``challenge`` {nonce} -> {mac, nonce2}: the head proves it holds the token
  (:func:`~fleet.lan.tokens.challenge_response`) and sends its own fresh nonce;
- ``prove`` {mac}: the device's answer to ``nonce2`` (:func:`~fleet.lan.tokens.device_response`),
  which unlocks the privileged operations on this connection only;
- ``ping``; ``probe_down`` {bytes} / ``probe_up`` {bytes}: raw bytes each way, to time the link
  (privileged, since they cost bandwidth); ``devices``: the cluster's nodes (privileged);
- ``certify`` {csr}: on a ``--tls`` head, a certificate signed by the head's CA for a key the
  device made itself (privileged; issued for the connection's peer address only), sealed with an
  HMAC of the token (:func:`~fleet.lan.tokens.certificate_mac`).

Framing: a 4-byte big-endian length, then a msgpack map. Requests are untrusted: at most
:data:`MAX_FRAME` bytes, strictly typed fields, known ops only; a bad one gets
``{"ok": false, "error": ...}`` and the agent keeps serving everyone else. Probe bytes follow a
reply header outside msgpack, at most :data:`MAX_PROBE_BYTES` per probe.
"""

from __future__ import annotations

import logging
import socket
import statistics
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgpack

from .discovery import BadAdvert, HeadAdvert
from .tokens import (NONCE_MAX, NONCE_MIN, certificate_mac, challenge_response, device_response, new_nonce,
                     verify_certificate_mac, verify_device_response, verify_response)

__all__ = [
    "MAX_FRAME", "MAX_PROBE_BYTES", "Agent", "AgentClient", "AgentError", "AgentProtocolError",
    "AgentRefused", "AgentUnreachable", "HeadNotProven", "LinkFigures",
]

log = logging.getLogger(__name__)

MiB: Final = 2**20
MAX_FRAME: Final = 64 * 1024
"""Largest request the agent reads; anything bigger is refused before it is read."""
MAX_REPLY: Final = 4 * MiB
"""Largest reply a client reads (a device list of a big cluster is larger than a request)."""
MAX_PROBE_BYTES: Final = 16 * MiB
IO_TIMEOUT_S: Final = 10.0
"""Time a request may take to arrive in full, and per-write timeout, at the agent: an idle or
trickling client is dropped."""
MAX_CONNECTIONS: Final = 16
_CHUNK: Final = 64 * 1024
_ZEROS: Final = bytes(_CHUNK)
_HEADER: Final = struct.Struct(">I")

# op -> {field: type}; every field is required and no other is accepted
_SCHEMA: Final[dict[str, dict[str, type]]] = {
    "info": {}, "challenge": {"nonce": bytes}, "prove": {"mac": bytes}, "ping": {},
    "probe_down": {"bytes": int}, "probe_up": {"bytes": int}, "devices": {}, "certify": {"csr": bytes},
}
_PRIVILEGED: Final = frozenset({"probe_down", "probe_up", "devices", "certify"})
CSR_MAX: Final = 16 * 1024
"""Largest certificate signing request the agent takes (ours are about 500 bytes)."""

Signer = Callable[[bytes, str], tuple[bytes, bytes]]
"""(CSR PEM, peer address) -> (certificate PEM, CA certificate PEM); raises ValueError to refuse."""


class AgentError(Exception):
    """Something went wrong talking to an agent; the message says what and what to do."""


class AgentUnreachable(AgentError):
    """No agent answered at the address (refused, timed out, unreachable, closed early)."""


class AgentProtocolError(AgentError):
    """The peer sent something that is not a valid tilefleet agent message."""


class AgentRefused(AgentError):
    """The agent answered ``ok: false``; the message carries its reason."""


class HeadNotProven(AgentError):
    """The head failed the join challenge: it does not hold the token its advert claims."""


class _FrameError(ValueError):
    """A frame could not be read as a message; the connection cannot be trusted any further."""


class _Closed(Exception):
    """The peer closed the connection cleanly between messages."""


# --------------------------------------------------------------------------------------------------
# Framing (both sides)
# --------------------------------------------------------------------------------------------------


def encode_frame(message: dict[str, Any]) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    return _HEADER.pack(len(body)) + body


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:  # a whole message in time, not just each byte: no trickling peer holds on
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no complete message within the time limit ({len(buf)} of {n} bytes)")
            sock.settimeout(left)
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            if not buf:
                raise _Closed()
            raise _FrameError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def read_frame(sock: socket.socket, max_size: int, deadline: float | None = None) -> dict[str, Any]:
    """One message; :class:`_FrameError` if it is too big, not msgpack, or not a map of text keys;
    ``TimeoutError`` if it is not complete by ``deadline`` (``time.monotonic()``)."""
    if deadline is not None:
        timeout = sock.gettimeout()
        try:
            return _read_frame(sock, max_size, deadline)
        finally:
            sock.settimeout(timeout)  # the socket's own timeout again, for what follows the read
    return _read_frame(sock, max_size, None)


def _read_frame(sock: socket.socket, max_size: int, deadline: float | None) -> dict[str, Any]:
    header = _recv_exact(sock, _HEADER.size, deadline)
    (size,) = _HEADER.unpack(header)
    if size > max_size:
        raise _FrameError(f"message of {size} bytes is larger than the {max_size}-byte limit "
                          f"(it starts {header!r})")
    try:
        body = _recv_exact(sock, size, deadline) if size else b""
    except _Closed:
        raise _FrameError(f"connection closed before a {size}-byte message") from None
    try:
        msg = msgpack.unpackb(body, raw=False, strict_map_key=True, max_str_len=max_size,
                              max_bin_len=max_size, max_array_len=4096, max_map_len=4096, max_ext_len=0)
    except Exception as e:  # msgpack raises several types for corrupt input
        raise _FrameError(f"message is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(msg, dict):
        raise _FrameError(f"message must be a msgpack map, got {type(msg).__name__}")
    return msg


def validate_request(msg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(op, fields) of a request, or ValueError saying what is wrong with it."""
    op = msg.get("op")
    if not isinstance(op, str) or op not in _SCHEMA:
        raise ValueError(f"unknown op {op!r:.40}; known ops: {', '.join(sorted(_SCHEMA))}")
    schema = _SCHEMA[op]
    extra = sorted(set(msg) - set(schema) - {"op"})
    if extra:
        raise ValueError(f"op {op!r} takes {sorted(schema) or 'no fields'}, got unexpected {extra}")
    for key, kind in schema.items():
        if key not in msg:
            raise ValueError(f"op {op!r} needs field {key!r}")
        v = msg[key]
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ValueError(f"op {op!r}: field {key!r} must be {kind.__name__}, got {type(v).__name__}")
    if "nonce" in msg and not NONCE_MIN <= len(msg["nonce"]) <= NONCE_MAX:
        raise ValueError(f"nonce must be {NONCE_MIN}..{NONCE_MAX} bytes, got {len(msg['nonce'])}")
    if "mac" in msg and len(msg["mac"]) != 32:
        raise ValueError(f"mac must be 32 bytes, got {len(msg['mac'])}")
    if "csr" in msg and not 1 <= len(msg["csr"]) <= CSR_MAX:
        raise ValueError(f"csr must be 1..{CSR_MAX} bytes, got {len(msg['csr'])}")
    if "bytes" in msg and not 1 <= msg["bytes"] <= MAX_PROBE_BYTES:
        raise ValueError(f"probe size must be 1..{MAX_PROBE_BYTES} bytes, got {msg['bytes']}")
    return op, {k: msg[k] for k in schema}


# --------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------


class Agent:
    """The head's agent. The socket is bound on construction, so a busy port fails at once
    (``OSError``), before anything else is started; :meth:`start` begins serving on threads.

    ``token`` None means insecure mode: the challenge answers ``{"insecure": true}`` and
    privileged ops need no proof. ``devices`` is called per ``devices`` request; ``signer`` (a
    ``--tls`` head's :class:`~fleet.lan.tls.Signer`) per ``certify`` request.
    """

    def __init__(self, advert: HeadAdvert, token: bytes | None, devices: Callable[[], list[dict[str, Any]]],
                 *, host: str, port: int, signer: Signer | None = None) -> None:
        self.advert = advert
        self._token = bytes(token) if token is not None else None
        self._devices = devices
        self._signer = signer
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(0.5)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._accept_loop, name="tilefleet-agent", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept() at once
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(timeout=2)
        self._sock.close()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, peer = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if self._stop.is_set():
                    return
                continue
            if not self._slots.acquire(blocking=False):
                _try_send(conn, {"ok": False, "error": f"busy: {MAX_CONNECTIONS} connections open, try again"})
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, peer), daemon=True).start()

    def _serve(self, conn: socket.socket, peer: Any) -> None:
        try:
            conn.settimeout(IO_TIMEOUT_S)
            session: dict[str, Any] = {"nonce2": None, "proven": self._token is None}
            while not self._stop.is_set():
                try:
                    msg = read_frame(conn, MAX_FRAME, deadline=time.monotonic() + IO_TIMEOUT_S)
                except _Closed:
                    return
                except _FrameError as e:
                    _try_send(conn, {"ok": False, "error": str(e)})
                    return
                try:
                    op, args = validate_request(msg)
                except ValueError as e:
                    conn.sendall(encode_frame({"ok": False, "error": str(e)}))
                    continue
                if op in _PRIVILEGED and not session["proven"]:
                    conn.sendall(encode_frame({"ok": False, "error": f"op {op!r} needs the device's proof: "
                                                                     "send 'challenge', then 'prove'"}))
                    continue
                if not self._handle(conn, op, args, session, str(peer[0])):
                    return
        except (OSError, TimeoutError) as e:
            log.debug("agent connection from %s ended: %s", peer, e)
        except Exception:  # one client's trouble must not stop the agent
            log.exception("agent connection from %s failed", peer)
        finally:
            conn.close()
            self._slots.release()

    def _handle(self, conn: socket.socket, op: str, args: dict[str, Any], session: dict[str, Any],
                peer_ip: str) -> bool:
        """Answer one valid request; False closes the connection."""
        send = lambda m: conn.sendall(encode_frame(m))  # noqa: E731
        if op == "info":
            send({"ok": True, "advert": self.advert.to_txt(), "host": self.advert.host})
        elif op == "ping":
            send({"ok": True})
        elif op == "challenge":
            if self._token is None:
                send({"ok": True, "insecure": True})
            else:
                session["nonce2"] = new_nonce()
                send({"ok": True, "mac": challenge_response(self._token, args["nonce"]), "nonce2": session["nonce2"]})
        elif op == "prove":
            nonce2, session["nonce2"] = session["nonce2"], None  # one answer per nonce
            if self._token is None:
                session["proven"] = True
                send({"ok": True})
            elif nonce2 is None or not verify_device_response(self._token, nonce2, args["mac"]):
                send({"ok": False, "error": "device proof failed: this device does not hold the cluster's token"})
                return False
            else:
                session["proven"] = True
                send({"ok": True})
        elif op == "probe_down":
            n = args["bytes"]
            send({"ok": True, "bytes": n})
            while n > 0:
                k = min(n, _CHUNK)
                conn.sendall(_ZEROS[:k])
                n -= k
        elif op == "probe_up":
            n = args["bytes"]
            send({"ok": True, "ready": True})
            t0 = time.perf_counter()
            got = 0
            while got < n:
                chunk = conn.recv(min(n - got, 1 << 20))
                if not chunk:
                    return False
                got += len(chunk)
            send({"ok": True, "received": got, "seconds": time.perf_counter() - t0})
        elif op == "devices":
            try:
                devices = self._devices()
            except Exception as e:  # Ray's errors become the reply, the agent stays up
                send({"ok": False, "error": f"cannot list the cluster's nodes: {type(e).__name__}: {e}"})
            else:
                send({"ok": True, "devices": devices})
        elif op == "certify":
            send(self._certify(args["csr"], peer_ip))
        return True

    def _certify(self, csr: bytes, peer_ip: str) -> dict[str, Any]:
        if self._signer is None or self._token is None:
            return {"ok": False, "error": "this head does not use TLS (start it with --tls); join without a certificate"}
        try:
            cert, ca = self._signer(csr, peer_ip)
        except ValueError as e:  # TlsError derives from it: the request is refused, the agent serves on
            return {"ok": False, "error": f"certificate refused: {e}"}
        log.info("issued a TLS certificate for %s", peer_ip)
        return {"ok": True, "cert": cert, "ca": ca, "mac": certificate_mac(self._token, csr, cert, ca)}


def _try_send(conn: socket.socket, message: dict[str, Any]) -> None:
    try:
        conn.sendall(encode_frame(message))
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


class LinkFigures(NamedTuple):
    """The link to a head as measured by :meth:`AgentClient.probe`; latency is one-way (half the
    median round trip), as the catalog's profiles state it."""

    down_mbps: float
    up_mbps: float
    latency_ms: float


class AgentClient:
    """One connection to a head's agent; authentication (:meth:`prove_head`) lasts for it.

    Every network problem becomes an :class:`AgentError` subclass with a message naming the
    address and the likely cause.
    """

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self._sock: socket.socket | None = None
        self.proven = False

    @property
    def where(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _connect(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            except ConnectionRefusedError:
                raise AgentUnreachable(f"no tilefleet agent at {self.where} (connection refused): is "
                                       "`tilefleet head` running there, and is that its --agent-port?") from None
            except (TimeoutError, socket.timeout):
                raise AgentUnreachable(f"no answer from {self.where} within {self.timeout:g} s: is the host "
                                       "up, on this LAN, and not blocking the port?") from None
            except OSError as e:
                raise AgentUnreachable(f"cannot reach a tilefleet agent at {self.where}: "
                                       f"{e.strerror or e}") from None
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.proven = False

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _io(self, fn: Callable[[socket.socket], Any]) -> Any:
        sock = self._connect()
        try:
            return fn(sock)
        except (_Closed, _FrameError) as e:
            self.close()
            what = "closed the connection" if isinstance(e, _Closed) else f"sent a bad message ({e})"
            raise AgentProtocolError(f"the peer at {self.where} {what}: expected a tilefleet agent (the port "
                                     "`tilefleet head` prints as its agent port); is something else listening "
                                     "there?") from None
        except (TimeoutError, socket.timeout):
            self.close()
            raise AgentUnreachable(f"the agent at {self.where} stopped answering "
                                   f"({self.timeout:g} s timeout)") from None
        except OSError as e:
            self.close()
            raise AgentUnreachable(f"lost the connection to the agent at {self.where}: {e.strerror or e}") from None

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and return its reply; :class:`AgentRefused` if the reply is ``ok: false``."""
        def exchange(sock: socket.socket) -> dict[str, Any]:
            sock.sendall(encode_frame({"op": op, **fields}))
            return read_frame(sock, MAX_REPLY, deadline=time.monotonic() + self.timeout)

        reply = self._io(exchange)
        if reply.get("ok") is not True:
            err = reply.get("error")
            raise AgentRefused(f"the agent at {self.where} refused {op!r}: "
                               f"{err if isinstance(err, str) else 'no reason given'}")
        return reply

    def info(self) -> HeadAdvert:
        """The head's advert, validated as strictly as one received over zeroconf."""
        reply = self.call("info")
        txt, host = reply.get("advert"), reply.get("host")
        if not isinstance(host, str):
            raise AgentProtocolError(f"the agent at {self.where} sent an info reply without a host")
        try:
            return HeadAdvert.from_txt(txt, host)  # type: ignore[arg-type]
        except BadAdvert as e:
            raise AgentProtocolError(f"the agent at {self.where} sent a bad advert: {e}") from None

    def prove_head(self, token: bytes | None, *, insecure: bool = False) -> None:
        """Mutual proof on this connection: the head answers our fresh nonce first, and only if
        its answer is right do we answer its nonce. ``token`` None with ``insecure`` accepts only
        an insecure head; raises :class:`HeadNotProven` or :class:`AgentRefused`."""
        nonce = new_nonce()
        reply = self.call("challenge", nonce=nonce)
        if reply.get("insecure") is True:
            if not insecure:
                raise HeadNotProven(f"the head at {self.where} runs without a token (--insecure); "
                                    "join it with --insecure if you trust this LAN")
            self.call("prove", mac=bytes(32))
            self.proven = True
            return
        if insecure or token is None:
            raise HeadNotProven(f"the head at {self.where} requires a token; this device has none "
                                "(drop --insecure and give --token-file)")
        mac, nonce2 = reply.get("mac"), reply.get("nonce2")
        if not isinstance(mac, bytes) or not verify_response(token, nonce, mac):
            raise HeadNotProven(f"head at {self.where} failed the join challenge: it does not hold the token "
                                "its advert claims (a rogue or misconfigured head); not joining")
        if not isinstance(nonce2, bytes) or not NONCE_MIN <= len(nonce2) <= NONCE_MAX:
            raise AgentProtocolError(f"the agent at {self.where} sent a bad nonce2")
        self.call("prove", mac=device_response(token, nonce2))
        self.proven = True

    def ping(self) -> float:
        """Round-trip seconds of one tiny request."""
        t0 = time.perf_counter()
        self.call("ping")
        return time.perf_counter() - t0

    def probe_down(self, n: int) -> float:
        """Seconds to receive ``n`` bytes from the agent (request to last byte)."""
        def run(sock: socket.socket) -> float:
            t0 = time.perf_counter()
            sock.sendall(encode_frame({"op": "probe_down", "bytes": int(n)}))
            head = read_frame(sock, MAX_FRAME)
            if head.get("ok") is not True or head.get("bytes") != n:
                raise _FrameError(f"probe refused: {head.get('error', head)!r:.200}")
            got = 0
            while got < n:
                chunk = sock.recv(min(n - got, 1 << 20))
                if not chunk:
                    raise _FrameError(f"closed after {got} of {n} probe bytes")
                got += len(chunk)
            return time.perf_counter() - t0

        return float(self._io(run))

    def probe_up(self, n: int) -> float:
        """Seconds to send ``n`` bytes to the agent (request to its receipt)."""
        def run(sock: socket.socket) -> float:
            t0 = time.perf_counter()
            sock.sendall(encode_frame({"op": "probe_up", "bytes": int(n)}))
            head = read_frame(sock, MAX_FRAME)
            if head.get("ok") is not True:
                raise _FrameError(f"probe refused: {head.get('error', head)!r:.200}")
            left = n
            while left > 0:
                k = min(left, _CHUNK)
                sock.sendall(_ZEROS[:k])
                left -= k
            done = read_frame(sock, MAX_FRAME)
            if done.get("ok") is not True or done.get("received") != n:
                raise _FrameError(f"probe not confirmed: {done!r:.200}")
            return time.perf_counter() - t0

        return float(self._io(run))

    def probe(self, *, pings: int = 10, budget_s: float = 1.5, first_bytes: int = 256 * 1024,
              max_bytes: int = 4 * MiB) -> LinkFigures:
        """Measure the link: median of ``pings`` round trips (reported one-way, as the catalog's
        latency), then each direction with a small transfer sized up so that the second one lasts
        about a quarter of ``budget_s``, at most ``max_bytes``. Needs :meth:`prove_head` first
        (unless the head is insecure)."""
        rtts = [self.ping() for _ in range(max(1, pings))]
        rtt = statistics.median(rtts)
        rates = []
        for probe in (self.probe_down, self.probe_up):
            n = first_bytes
            t = probe(n)
            target = max(first_bytes, min(max_bytes, int(n / max(t, 1e-6) * budget_s / 4)))
            if target > n:
                n, t = target, probe(target)
            rates.append(n * 8 / max(t - rtt, t / 2, 1e-6) / 1e6)
        return LinkFigures(rates[0], rates[1], rtt / 2 * 1e3)

    def certify(self, csr: bytes, token: bytes) -> tuple[bytes, bytes]:
        """(certificate, CA certificate) for ``csr`` from a ``--tls`` head, after :meth:`prove_head`;
        the reply's seal is checked with the token before anything is returned."""
        if not self.proven:
            self.prove_head(token)
        reply = self.call("certify", csr=csr)
        cert, ca, mac = reply.get("cert"), reply.get("ca"), reply.get("mac")
        if not (isinstance(cert, bytes) and isinstance(ca, bytes) and 0 < len(cert) <= CSR_MAX
                and 0 < len(ca) <= CSR_MAX):
            raise AgentProtocolError(f"the agent at {self.where} sent a bad certificate reply")
        if not verify_certificate_mac(token, csr, cert, ca, mac):
            raise HeadNotProven(f"the certificate from {self.where} is not sealed with the cluster's token (changed "
                                "on the way, or not from the head); not using it")
        return cert, ca

    def devices(self, token: bytes | None = None, *, insecure: bool = False) -> list[dict[str, Any]]:
        """The cluster's nodes as the head sees them (proves both sides first if not yet done)."""
        if not self.proven:
            self.prove_head(token, insecure=insecure)
        devices = self.call("devices").get("devices")
        if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
            raise AgentProtocolError(f"the agent at {self.where} sent a bad device list")
        return devices
