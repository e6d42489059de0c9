"""Trust before joining: the one check a device, a client or ``tilefleet devices`` makes of a head.

:func:`check_head` is the only implementation: versions (tilefleet, wire, Ray, Python must match;
the message says what to install), the token's fingerprint against the advert's, then a fresh HMAC
challenge the head must answer with the token. :func:`pick_head` applies it to every head found
(zeroconf or ``--address``) and keeps the one that passes; rogue heads are logged and skipped.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .agent import AgentClient, AgentError
from .discovery import WIRE_VERSION, HeadAdvert, static_heads
from .raynode import DEFAULT_AGENT_PORT
from .state import LanError
from .tokens import Token, resolve_token

log = logging.getLogger("tilefleet.lan")


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "0+unknown"


def local_versions() -> dict[str, str]:
    """What must match between a head and its devices (Ray refuses mismatched Ray or Python)."""
    return {"tilefleet_version": _package_version("tilefleet"), "wire_version": str(WIRE_VERSION),
            "ray_version": _package_version("ray"), "python_version": platform.python_version()}


def version_mismatch(advert: HeadAdvert, local: Mapping[str, str] | None = None) -> str | None:
    """None if this device can join ``advert``'s head, else one message naming every difference
    and what to install here."""
    mine = dict(local or local_versions())
    theirs = {"tilefleet_version": advert.tilefleet_version, "wire_version": str(advert.wire_version),
              "ray_version": advert.ray_version, "python_version": advert.python_version}
    fixes = {
        "tilefleet_version": lambda v: f"install tilefleet {v} here (the head's checkout, or "
                                       f"`pip install tilefleet=={v}`)",
        "wire_version": lambda v: "upgrade the older side: the join protocol differs",
        "ray_version": lambda v: f"`pip install 'ray=={v}'` here (Ray needs the same version on every node)",
        "python_version": lambda v: f"use Python {v} here (Ray needs the same Python on every node)",
    }
    what = {"tilefleet_version": "tilefleet", "wire_version": "wire protocol", "ray_version": "Ray",
            "python_version": "Python"}
    problems = [f"{what[k]} {theirs[k]} on the head, {mine[k]} here: {fixes[k](theirs[k])}"
                for k in theirs if theirs[k] != mine.get(k)]
    if not problems:
        return None
    return f"cannot join cluster {advert.cluster_name} at {advert.host}: " + "; ".join(problems)


def fingerprint_mismatch(advert: HeadAdvert, token: Token) -> str | None:
    """None if ``token`` is the one ``advert`` claims, else what to copy where."""
    if token.fingerprint == advert.token_fingerprint:
        return None
    return (f"your token (fingerprint {token.fingerprint}, {token.path}) is not the one of cluster "
            f"{advert.cluster_name} (fingerprint {advert.token_fingerprint}); copy the head's token file "
            f"(`tilefleet head` printed its path, by default ~/.config/tilefleet/token) to this device")


SETTLE_S = 1.0  # after the first advert, how long more adverts of the same cluster may take to arrive


INSECURE_FINGERPRINT = "0" * 16
"""The fingerprint an ``--insecure`` head advertises: no token, nothing to compare."""


def _zeroconf(interfaces: Any) -> Any:
    import zeroconf

    try:
        return zeroconf.Zeroconf(interfaces=interfaces)
    except OSError as e:
        raise LanError(f"cannot use zeroconf (mDNS) here ({e.strerror or e}); pass --address HOST:AGENTPORT",
                       1) from None


def _find_heads(*, cluster: str | None, address: str | None, timeout: float,
                node_ip: str | None) -> list[tuple[HeadAdvert, AgentClient]]:
    """Candidate heads and a connection to each one's agent: ``--address``, else zeroconf.

    From zeroconf, every advert of the cluster counts (a rogue may copy a real head's name, id and
    fingerprint); :func:`join` keeps the ones that pass the challenge.
    """
    if address:
        try:
            ((host, port),) = static_heads(address, default_port=DEFAULT_AGENT_PORT)
        except ValueError as e:
            raise LanError(f"--address: {e}; give one head as HOST[:AGENTPORT]") from None
        client = AgentClient(host, port, timeout=timeout)
        advert = client.info()
        if cluster and advert.cluster_name.casefold() != cluster.casefold():
            raise LanError(f"the head at {client.where} runs cluster {advert.cluster_name}, not {cluster}")
        return [(advert, client)]
    import zeroconf

    from .discovery import AmbiguousHead, HeadRegistry, NoHeadFound, ZeroconfBrowser

    zc = _zeroconf([node_ip] if node_ip else zeroconf.InterfaceChoice.All)
    try:
        registry = HeadRegistry()
        with ZeroconfBrowser(registry, zc):
            try:
                registry.wait_for(cluster, timeout=timeout)
            except AmbiguousHead:
                pass  # several adverts of one name: the challenge decides below
            time.sleep(SETTLE_S)  # adverts of the same name that arrive a moment later count too
            found = registry.matching(cluster) or [registry.find(cluster)]
    except NoHeadFound as e:
        raise LanError(str(e), 1) from None
    except AmbiguousHead as e:
        raise LanError(str(e)) from None
    finally:
        zc.close()
    return [(a, AgentClient(a.host, a.agent_port, timeout=timeout)) for a in found]


def pick_head(token: Token | None, *, cluster: str | None = None, address: str | None = None,
              timeout: float = 5.0, node_ip: str | None = None) -> tuple[HeadAdvert, AgentClient]:
    """The one head (found by zeroconf, or at ``address``) that passes every check: versions, the
    token's fingerprint and the challenge. Rogue heads (failed challenge) are reported and skipped."""
    candidates = _find_heads(cluster=cluster, address=address, timeout=timeout, node_ip=node_ip)
    proven: list[tuple[HeadAdvert, AgentClient]] = []
    problems: list[str] = []
    for advert, client in candidates:
        try:
            check_head(advert, client, token)
            proven.append((advert, client))
        except (LanError, AgentError) as e:
            client.close()
            if len(candidates) == 1:
                raise
            problems.append(f"{advert.host}:{advert.agent_port}: {e}")
            log.warning("tilefleet: skipping the head at %s:%s: %s", advert.host, advert.agent_port, e)
    if not proven:
        raise LanError("no head passed the checks:\n  " + "\n  ".join(problems))
    if len({a.cluster_id for a, _ in proven}) > 1:
        for _, c in proven:
            c.close()
        where = ", ".join(f"{a.cluster_name} (id {a.cluster_id[:8]}) at {a.host}" for a, _ in proven)
        raise LanError(f"{len(proven)} clusters hold your token and match: {where}; pass --cluster NAME or --address")
    for _, c in proven[1:]:
        c.close()
    return proven[0]


def check_head(advert: HeadAdvert, client: AgentClient, token: Token | None, *, versions: bool = True) -> None:
    """The trust check, the only one: versions (when this side will run Ray with the head), the
    token's fingerprint, then the head's proof that it holds the token. Raises ``LanError`` or
    ``AgentError`` (``HeadNotProven`` for a head that fails the challenge)."""
    problem = trust_problem(advert, token, versions=versions)
    if problem:
        raise LanError(problem)
    client.prove_head(token.value if token else None, insecure=token is None)


def trust_problem(advert: HeadAdvert, token: Token | None, *, versions: bool = True) -> str | None:
    """What the advert alone already rules out (no network): None when the head may be challenged."""
    if versions:
        problem = version_mismatch(advert)
        if problem:
            return problem
    if token is not None and advert.token_fingerprint == INSECURE_FINGERPRINT:
        return (f"cluster {advert.cluster_name} runs without a token (--insecure); use --insecure if you "
                "trust this LAN")
    if token is not None:
        return fingerprint_mismatch(advert, token)
    return None


def _browse(timeout: float) -> list[HeadAdvert]:
    import zeroconf

    from .discovery import HeadRegistry, ZeroconfBrowser

    zc = _zeroconf(zeroconf.InterfaceChoice.All)
    try:
        registry = HeadRegistry()
        with ZeroconfBrowser(registry, zc):
            time.sleep(timeout)
        return registry.heads()
    finally:
        zc.close()


def collect_devices(*, address: str | None, cluster: str | None, token_file: str | None, insecure: bool,
                    timeout: float) -> list[dict[str, Any]]:
    """Every head found (zeroconf or ``address``) with its advert and device list, or the reason it
    could not be listed (each advert passes :func:`trust_problem` first, versions aside: listing runs
    no Ray; the agent itself challenges this side before it answers)."""
    token: Token | None = None
    token_error = None
    if not insecure:
        try:
            token = resolve_token(token_file, create=False)
        except LanError as e:
            token_error = str(e)
    if address:
        try:
            targets: list[tuple[str, int, HeadAdvert | None]] = [
                (h, p, None) for h, p in static_heads(address, default_port=DEFAULT_AGENT_PORT)]
        except ValueError as e:
            raise LanError(f"--address: {e}") from None
    else:
        targets = [(a.host, a.agent_port, a) for a in _browse(timeout)]
    heads = [_list_head(host, port, advert, cluster, token, token_error, insecure, timeout)
             for host, port, advert in targets]
    return [h for h in heads if h is not None]


def _list_head(host: str, port: int, advert: HeadAdvert | None, cluster: str | None, token: Token | None,
               token_error: str | None, insecure: bool, timeout: float) -> dict[str, Any] | None:
    """One head's entry for ``tilefleet devices``; None when it runs another cluster than asked."""
    entry: dict[str, Any] = {"agent": f"{host}:{port}", "advert": None, "devices": None, "error": None}
    try:
        with AgentClient(host, port, timeout=timeout) as client:
            advert = advert or client.info()
            entry["advert"] = dataclasses.asdict(advert)
            if cluster and advert.cluster_name.casefold() != cluster.casefold():
                return None
            if token is None and not insecure:
                entry["error"] = token_error
                return entry
            problem = trust_problem(advert, token, versions=False)
            if problem:
                tokenless = token is not None and advert.token_fingerprint == INSECURE_FINGERPRINT
                entry["error"] = problem if tokenless else f"not your cluster: {problem}"
                return entry
            entry["devices"] = client.devices(token.value if token else None, insecure=token is None)
    except (AgentError, LanError) as e:
        entry["error"] = str(e)
    return entry
