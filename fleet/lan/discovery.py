"""Finding a tilefleet head on the LAN: zeroconf adverts, their validation, and the join challenge.

Why this shape (after pychromecast's ``discovery.py`` and python-zeroconf's examples): a head
advertises ``_tilefleet._tcp.local.`` with everything a device needs to judge it *before* joining
(cluster name and stable id, Ray and agent ports, versions, a fingerprint of the join token) in
its TXT record. The state of what is on the LAN lives in :class:`HeadRegistry`, which is pure:
raw records go in (``apply_add``/``apply_update``/``apply_remove``), :class:`DiscoveryListener`
calls come out, so every rule (validation, versions, duplicates) is tested by injecting records,
with no multicast. :class:`ZeroconfBrowser` and :class:`ZeroconfAdvertiser` are thin adapters
around an *injected* ``zeroconf.Zeroconf``, so one instance serves a process and tests pass fakes.
Where multicast is blocked, :func:`static_heads` parses a ``--address`` list instead.

Adverts are untrusted input (anyone on the LAN can send one), hence strict validation, bounded
sizes, and a token *fingerprint* only: the token itself is proved with :func:`fleet.lan.tokens.challenge_response`.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Final, Protocol

import zeroconf as _zc
from zeroconf import Zeroconf

__all__ = [
    "SERVICE_TYPE", "WIRE_VERSION", "AmbiguousHead", "BadAdvert", "DiscoveryListener", "HeadAdvert",
    "HeadRegistry", "NoHeadFound", "ZeroconfAdvertiser", "ZeroconfBrowser", "static_heads",
]

log = logging.getLogger(__name__)

SERVICE_TYPE: Final = "_tilefleet._tcp.local."
WIRE_VERSION: Final = 1
"""Version of the advert and join protocol; a head speaking another one is ignored, not misread."""

TXT_ENTRY_MAX: Final = 255  # DNS: one TXT string (``key=value``) is at most 255 bytes
TXT_ENTRIES_MAX: Final = 64  # ours has 12; a record with more is not a tilefleet advert
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,63}")
_VERSION_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}")
_HEX_RE: Final = re.compile(r"[0-9a-f]{16,64}")
_LABEL_RE: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_INSTANCE_RE: Final = re.compile(r"[0-9a-f]{8,32}")
_OPTIONAL: Final = frozenset({"tls", "instance"})
"""Advert keys a head may leave out (added after wire version 1 began; absent means off / unknown)."""


class BadAdvert(ValueError):
    """An advert field is missing or wrong; ``key`` names it, the message says what is accepted."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"advert key {key!r}: {problem}")
        self.key = key


class NoHeadFound(LookupError):
    """No usable head was seen; the message says what to check and which clusters were seen."""


class AmbiguousHead(LookupError):
    """More than one head matches; joining either could join the wrong cluster, so none is picked."""


# --- Token fingerprint and the join challenge -----------------------------------------------------


# --- The advert -----------------------------------------------------------------------------------


def _valid_host(host: object) -> bool:
    if not isinstance(host, str) or not host or len(host) > 253:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return all(_LABEL_RE.fullmatch(label) for label in host.removesuffix(".").split("."))


@dataclass(frozen=True)
class HeadAdvert:
    """What a head tells the LAN; validated on construction, so an instance is always a sane advert."""

    cluster_name: str
    cluster_id: str
    host: str
    ray_port: int
    agent_port: int
    tilefleet_version: str
    wire_version: int
    ray_version: str
    python_version: str
    token_fingerprint: str
    tls: bool = False
    """Ray's traffic uses TLS: a node needs a certificate from the head's CA (``certify`` at the agent)."""
    instance: str = ""
    """Random per start of the head: a device that sees it change knows the head restarted (its old
    Ray node belongs to a cluster that is gone) and joins again."""

    def __post_init__(self) -> None:
        for key in ("cluster_name", "cluster_id"):
            v = getattr(self, key)
            if not isinstance(v, str) or not _NAME_RE.fullmatch(v):
                raise BadAdvert(key, f"must be 1..63 letters, digits, '-', '_' or '.', got {v!r}")
        if not _valid_host(self.host):
            raise BadAdvert("host", f"must be an IP address or a DNS host name, got {self.host!r}")
        for key in ("ray_port", "agent_port"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
                raise BadAdvert(key, f"must be an integer port 1..65535, got {v!r}")
        if not isinstance(self.wire_version, int) or isinstance(self.wire_version, bool) or self.wire_version < 1:
            raise BadAdvert("wire_version", f"must be an integer >= 1, got {self.wire_version!r}")
        for key in ("tilefleet_version", "ray_version", "python_version"):
            v = getattr(self, key)
            if not isinstance(v, str) or not _VERSION_RE.fullmatch(v):
                raise BadAdvert(key, f"must be a version string of 1..64 letters, digits, '.', '+', '!', "
                                     f"'_' or '-', got {v!r}")
        fp = self.token_fingerprint
        if not isinstance(fp, str) or not _HEX_RE.fullmatch(fp):
            raise BadAdvert("token_fingerprint", f"must be 16..64 lowercase hex characters, got {fp!r}")
        if not isinstance(self.tls, bool):
            raise BadAdvert("tls", f"must be a bool, got {self.tls!r}")
        if not isinstance(self.instance, str) or (self.instance and not _INSTANCE_RE.fullmatch(self.instance)):
            raise BadAdvert("instance", f"must be empty or 8..32 lowercase hex characters, got {self.instance!r}")

    def to_txt(self) -> dict[str, str]:
        """The TXT record; ``host`` is not in it, since the address record already carries it."""
        txt = {k: str(v) for k, v in asdict(self).items() if k not in ("host", "tls", "instance")}
        txt["tls"] = "1" if self.tls else "0"
        if self.instance:
            txt["instance"] = self.instance
        return txt

    @classmethod
    def from_txt(cls, txt: Mapping[bytes | str, bytes | str | None], host: str) -> HeadAdvert:
        """Parse an untrusted TXT record; raises :class:`BadAdvert` naming the key at fault.

        Keys are matched case-insensitively (DNS-SD says so) and unknown keys are ignored, so a
        later head may add fields without breaking older devices.
        """
        if not isinstance(txt, Mapping):
            raise BadAdvert("*", f"the TXT record must be a mapping, got {type(txt).__name__}")
        if len(txt) > TXT_ENTRIES_MAX:
            raise BadAdvert("*", f"the TXT record has {len(txt)} entries; an advert has at most {TXT_ENTRIES_MAX}")
        values: dict[str, str | None] = {}
        for k, v in txt.items():
            key = _text(k, "*", "keys must be UTF-8 text").lower()
            raw = v.encode() if isinstance(v, str) else v
            if raw is not None and not isinstance(raw, (bytes, bytearray)):
                raise BadAdvert(key, f"value must be bytes or text, got {type(v).__name__}")
            size = len(key.encode()) + 1 + (len(raw) if raw is not None else 0)
            if size > TXT_ENTRY_MAX:
                raise BadAdvert(key, f"TXT entry is {size} bytes; one key=value entry holds at most {TXT_ENTRY_MAX}")
            values[key] = None if raw is None else _text(bytes(raw), key, "value must be UTF-8 text")
        parsed: dict[str, Any] = {"host": host}
        for f in fields(cls):
            if f.name == "host" or (f.name in _OPTIONAL and f.name not in values):
                continue
            if f.name not in values:
                wanted = ", ".join(x.name for x in fields(cls) if x.name != "host" and x.name not in _OPTIONAL)
                raise BadAdvert(f.name, f"missing; a tilefleet advert carries {wanted}")
            v = values[f.name]
            if v is None or not v:
                raise BadAdvert(f.name, "has no value")
            if f.name in ("ray_port", "agent_port", "wire_version"):
                if not re.fullmatch(r"[0-9]{1,6}", v):
                    what = "an integer port 1..65535" if f.name != "wire_version" else "an integer >= 1"
                    raise BadAdvert(f.name, f"must be {what}, got {v!r}")
                parsed[f.name] = int(v)
            elif f.name == "tls":
                if v not in ("0", "1"):
                    raise BadAdvert("tls", f"must be 0 or 1, got {v!r:.20}")
                parsed["tls"] = v == "1"
            else:
                parsed[f.name] = v.lower() if f.name == "token_fingerprint" else v
        return cls(**parsed)


def _text(raw: bytes | str, key: str, problem: str) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except (UnicodeDecodeError, AttributeError):
        raise BadAdvert(key, f"{problem}, got {raw!r:.80}") from None


def _wire_version_of(txt: Mapping[Any, Any]) -> int | None:
    """The advert's wire version if it states a readable one; checked before the rest is parsed,
    since a head of another version may use other keys and must not be reported as malformed."""
    for k, v in txt.items():
        if isinstance(k, bytes):
            k = k.decode("utf-8", "replace")
        if isinstance(k, str) and k.lower() == "wire_version":
            if isinstance(v, bytes):
                v = v.decode("utf-8", "replace")
            return int(v) if isinstance(v, str) and re.fullmatch(r"[0-9]{1,6}", v) else None
    return None


# --- The registry: pure state, listener calls out -------------------------------------------------


class DiscoveryListener(Protocol):
    """Told about heads as they come, change and go, keyed by their stable ``cluster_id``."""

    def added(self, advert: HeadAdvert) -> None: ...

    def updated(self, advert: HeadAdvert) -> None: ...

    def removed(self, cluster_id: str) -> None: ...


class HeadRegistry:
    """The heads seen on the LAN, by cluster id, fed with raw service records.

    Kept per service name internally (a removal names only the service) and reported per cluster
    id (the stable identity; a head that re-advertises under another name is the same head).
    Thread-safe: zeroconf feeds it from its own thread while the CLI calls :meth:`find`. Bad or
    foreign records are logged once and ignored, never raised: one broken device on the LAN must
    not stop every other device from joining.
    """

    def __init__(self, listeners: Iterable[DiscoveryListener] = ()) -> None:
        self._listeners = list(listeners)
        self._by_name: dict[str, HeadAdvert] = {}
        self._warned: dict[str, str] = {}
        self._cond = threading.Condition()

    def add_listener(self, listener: DiscoveryListener) -> None:
        self._listeners.append(listener)

    # -- records in --------------------------------------------------------------------------------
    def apply_add(self, name: str, txt: Mapping[bytes | str, bytes | str | None], host: str) -> None:
        """A service appeared; same handling as an update (a re-announced name is not new)."""
        self._apply(name, txt, host)

    def apply_update(self, name: str, txt: Mapping[bytes | str, bytes | str | None], host: str) -> None:
        """A service's record changed; ``updated`` is called only if the advert really differs."""
        self._apply(name, txt, host)

    def apply_remove(self, name: str) -> None:
        """A service went away; ``removed`` once no service carries its cluster id any more."""
        with self._cond:
            self._warned.pop(name, None)
            old = self._by_name.pop(name, None)
            events = self._diff(old, None)
        self._emit(events)

    def _apply(self, name: str, txt: Mapping[bytes | str, bytes | str | None], host: str) -> None:
        wire = _wire_version_of(txt) if isinstance(txt, Mapping) else None
        try:
            if wire is not None and wire != WIRE_VERSION:
                self._warn_once(name, f"ignoring tilefleet head {name!r}: wire version {wire}, this "
                                      f"tilefleet understands version {WIRE_VERSION} only (upgrade one side)")
                return
            advert = HeadAdvert.from_txt(txt, host)
        except BadAdvert as e:
            self._warn_once(name, f"ignoring malformed tilefleet advert {name!r} from {host!r}: {e}")
            return
        with self._cond:
            self._warned.pop(name, None)
            old = self._by_name.pop(name, None)
            self._by_name[name] = advert  # re-inserted: dict order is recency, the latest record wins
            events = self._diff(old, advert)
        self._emit(events)

    def _warn_once(self, name: str, message: str) -> None:
        # zeroconf re-announces records: one line per distinct problem, not one per packet
        with self._cond:
            if self._warned.get(name) == message:
                return
            self._warned[name] = message
        log.warning(message)

    def _current(self, cluster_id: str) -> HeadAdvert | None:
        return next((a for a in reversed(self._by_name.values()) if a.cluster_id == cluster_id), None)

    def _diff(self, old: HeadAdvert | None, new: HeadAdvert | None) -> list[tuple[str, Any]]:
        """Listener events for one service going from ``old`` to ``new``; called under the lock."""
        self._cond.notify_all()
        events: list[tuple[str, Any]] = []
        if old is not None and (new is None or old.cluster_id != new.cluster_id):
            still = self._current(old.cluster_id)
            events.append(("removed", old.cluster_id) if still is None else ("updated", still))
        if new is not None:
            others = [a for n, a in self._by_name.items() if a.cluster_id == new.cluster_id and a is not new]
            if old is None or old.cluster_id != new.cluster_id:
                events.append(("updated", new) if others else ("added", new))
            elif old != new:
                events.append(("updated", new))
        return events

    def _emit(self, events: list[tuple[str, Any]]) -> None:
        for method, arg in events:
            for listener in list(self._listeners):
                try:
                    getattr(listener, method)(arg)
                except Exception:  # a listener's bug must not stop discovery
                    log.exception("discovery listener %r failed in %s(%r)", listener, method, arg)

    # -- queries -----------------------------------------------------------------------------------
    def heads(self) -> list[HeadAdvert]:
        """The current adverts, one per cluster id (the latest record wins)."""
        with self._cond:  # _by_name is in recency order, so later records overwrite earlier ones
            return list({a.cluster_id: a for a in self._by_name.values()}.values())

    def matching(self, cluster_name: str | None = None) -> list[HeadAdvert]:
        """Every advert of ``cluster_name`` (or of any cluster), one per service, duplicates of a
        cluster id included: a rogue head may copy a real one's name, id and fingerprint, and only
        the join challenge tells them apart."""
        with self._cond:
            return [a for a in self._by_name.values()
                    if cluster_name is None or a.cluster_name.casefold() == cluster_name.casefold()]

    def find(self, cluster_name: str | None = None) -> HeadAdvert:
        """The one head to join: of ``cluster_name``, or the only cluster on the LAN.

        Raises :class:`NoHeadFound` or :class:`AmbiguousHead` with what to do next; guessing
        between two heads could hand a device to a stranger's cluster.
        """
        heads = self.heads()
        match = [h for h in heads if cluster_name is None or h.cluster_name.casefold() == cluster_name.casefold()]
        if not match:
            seen = ", ".join(f"{h.cluster_name} (id {h.cluster_id[:8]} at {h.host}:{h.ray_port})" for h in heads)
            which = f" for cluster {cluster_name!r}" if cluster_name is not None else ""
            raise NoHeadFound(
                f"no tilefleet head found{which}; check that `tilefleet head` is running, that this "
                "device is on the same LAN with multicast (mDNS, UDP 5353) allowed, or pass "
                f"--address HOST:PORT; clusters seen: {seen or 'none'}"
            )
        if len(match) == 1:
            return match[0]
        where = " and ".join(f"{h.cluster_name!r} id {h.cluster_id} at {h.host}:{h.ray_port}" for h in match)
        if cluster_name is not None:
            raise AmbiguousHead(
                f"{len(match)} heads advertise cluster {cluster_name!r} with different ids: {where}; "
                "stop the extra head (or rename its cluster), or pass --address HOST:PORT"
            )
        raise AmbiguousHead(
            f"{len(match)} tilefleet clusters on the LAN: {where}; pass --cluster NAME or --address HOST:PORT"
        )

    def wait_for(self, cluster_name: str | None = None, timeout: float = 5.0) -> HeadAdvert:
        """:meth:`find`, waiting up to ``timeout`` seconds for adverts to arrive (they take a moment)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                try:
                    return self.find(cluster_name)
                except NoHeadFound:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    self._cond.wait(left)


# --- zeroconf adapters ----------------------------------------------------------------------------


class ZeroconfBrowser:
    """Feeds a :class:`HeadRegistry` from a zeroconf ``ServiceBrowser`` on an injected instance."""

    def __init__(self, registry: HeadRegistry, zc: Zeroconf, *, resolve_timeout_s: float = 3.0) -> None:
        self.registry = registry
        self._zc = zc
        self._timeout_ms = max(1, int(resolve_timeout_s * 1000))
        self._browser: _zc.ServiceBrowser | None = None

    def start(self) -> None:
        if self._browser is None:
            self._browser = _zc.ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])

    def close(self) -> None:
        if self._browser is not None:
            self._browser.cancel()
            self._browser = None

    def __enter__(self) -> ZeroconfBrowser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: _zc.ServiceStateChange) -> None:
        """zeroconf's handler (it calls with these keyword names): resolve, then feed the registry."""
        try:
            if state_change is _zc.ServiceStateChange.Removed:
                self.registry.apply_remove(name)
                return
            info = zeroconf.get_service_info(service_type, name, timeout=self._timeout_ms)
            if info is None:
                log.warning("tilefleet head %r did not answer within %d ms; ignoring it for now", name,
                            self._timeout_ms)
                return
            addrs = sorted(info.parsed_addresses(), key=lambda a: ":" in a)  # IPv4 first
            host = addrs[0] if addrs else (info.server or "").removesuffix(".")
            txt = info.properties or {}
            if state_change is _zc.ServiceStateChange.Added:
                self.registry.apply_add(name, txt, host)
            else:
                self.registry.apply_update(name, txt, host)
        except Exception:  # runs on zeroconf's thread: log, never kill the browser
            log.exception("failed to handle tilefleet service %r (%s)", name, state_change)


class ZeroconfAdvertiser:
    """Registers a head's advert on an injected zeroconf instance; ``close`` withdraws it."""

    def __init__(self, advert: HeadAdvert, zc: Zeroconf) -> None:
        self.advert = advert
        self._zc = zc
        self._info: _zc.ServiceInfo | None = None

    @property
    def service_name(self) -> str:
        """``<cluster>-<id[:8]>``: readable, and unique even when two clusters share a name."""
        return f"{self.advert.cluster_name}-{self.advert.cluster_id[:8]}.{SERVICE_TYPE}"

    def service_info(self) -> _zc.ServiceInfo:
        try:
            ip = ipaddress.ip_address(self.advert.host)
        except ValueError:
            raise ValueError(f"advertise an IP address, not the host name {self.advert.host!r}") from None
        packed = socket.inet_aton(str(ip)) if ip.version == 4 else socket.inet_pton(socket.AF_INET6, str(ip))
        # the host record is named after the address, not the cluster: a second advert of the same
        # cluster (a restarted head elsewhere, or a rogue copying it) must not re-point this one
        server = f"tilefleet-{str(ip).replace('.', '-').replace(':', '-')}.local."
        return _zc.ServiceInfo(SERVICE_TYPE, self.service_name, addresses=[packed], port=self.advert.ray_port,
                               properties=self.advert.to_txt(), server=server)

    def start(self) -> None:
        if self._info is None:
            info = self.service_info()
            self._zc.register_service(info)
            self._info = info

    def close(self) -> None:
        if self._info is not None:
            info, self._info = self._info, None
            self._zc.unregister_service(info)

    def __enter__(self) -> ZeroconfAdvertiser:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- Static fallback ------------------------------------------------------------------------------


def static_heads(addresses: Iterable[str], default_port: int | None = None) -> list[tuple[str, int]]:
    """Parse ``"10.0.0.5:6379, headhost:6380"`` (or a list of such) into ``(host, port)`` pairs.

    For LANs where multicast is blocked. IPv6 is written ``[fe80::1]:6379``. Without
    ``default_port`` every entry needs its port; duplicates are dropped, order is kept.
    """
    if isinstance(addresses, str):
        addresses = [addresses]
    out: list[tuple[str, int]] = []
    pos = 0
    for chunk in addresses:
        if not isinstance(chunk, str):
            raise ValueError(f"addresses must be strings such as '10.0.0.5:6379', got {chunk!r}")
        for raw in chunk.split(","):
            pos += 1
            item = raw.strip()
            if not item:
                raise ValueError(f"empty entry {pos} in the address list; write HOST:PORT, comma-separated")
            host, port_s = _split_host_port(item)
            if port_s is None:
                if default_port is None:
                    raise ValueError(f"entry {pos} ({item!r}) has no port; write HOST:PORT, e.g. 10.0.0.5:6379")
                port = default_port
            elif not re.fullmatch(r"[0-9]{1,5}", port_s) or not 1 <= int(port_s) <= 65535:
                raise ValueError(f"bad port {port_s!r} in entry {pos} ({item!r}): a port is an integer 1..65535")
            else:
                port = int(port_s)
            if not _valid_host(host):
                raise ValueError(f"bad host {host!r} in entry {pos} ({item!r}): use an IP address or a host name")
            if (host, port) not in out:
                out.append((host, port))
    return out


_ADDR_RE: Final = re.compile(r"\[(?P<v6>[^\]]*)\](?::(?P<p6>.*))?|(?P<host>[^:\[\]]*)(?::(?P<port>[^:]*))?")


def _split_host_port(item: str) -> tuple[str, str | None]:
    m = _ADDR_RE.fullmatch(item)
    if m is None:
        raise ValueError(f"bad address {item!r}: write HOST:PORT, and IPv6 as [ADDRESS]:PORT")
    return (m["v6"], m["p6"]) if m["v6"] is not None else (m["host"], m["port"])
