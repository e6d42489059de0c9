"""Which address this node has, and whether a port is free: pure choices over what the OS reports.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from .state import LanError



def pick_ip(candidates: Iterable[str]) -> str:
    """The only non-loopback, non-link-local IPv4 address among ``candidates``, else an error."""
    ips = []
    for c in candidates:
        try:
            ip = ipaddress.ip_address(c)
        except ValueError:
            continue
        if ip.version == 4 and not ip.is_loopback and not ip.is_link_local and str(ip) not in ips:
            ips.append(str(ip))
    if len(ips) == 1:
        return ips[0]
    if not ips:
        raise LanError("this machine has no LAN IPv4 address; connect it to the LAN or pass --node-ip")
    raise LanError(f"this machine has several addresses ({', '.join(ips)}); pass --node-ip with the one on "
                   "the devices' LAN")


def choose_node_ip(explicit: str | None, head_host: str | None = None) -> str:
    """``--node-ip`` if given; else the address this host uses to reach ``head_host``; else the
    only LAN IPv4 address of this machine's interfaces."""
    if explicit:
        try:
            ip = ipaddress.ip_address(explicit)
        except ValueError:
            raise LanError(f"--node-ip {explicit!r} is not an IP address") from None
        mine = local_ips()
        if not ip.is_loopback and str(ip) not in mine:
            raise LanError(f"--node-ip {ip} is not an address of this machine (it has {', '.join(mine) or 'none'})")
        return str(ip)
    if head_host:
        try:
            with socket.socket(socket.AF_INET6 if ":" in head_host else socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((head_host, 9))  # UDP connect sends nothing: it asks the routing table
                return str(s.getsockname()[0])
        except OSError:
            pass
    return pick_ip(local_ips())


def local_ips() -> list[str]:
    """This machine's IPv4 addresses, as its interfaces list them."""
    import ifaddr

    return [ip.ip for a in ifaddr.get_adapters() for ip in a.ips if isinstance(ip.ip, str)]


def port_free(port: int, host: str = "") -> bool:
    """Whether a TCP listener could bind ``host:port`` now (wildcard: on every address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError:
            return False
    return True
