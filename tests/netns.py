"""A LAN in one machine: real network namespaces on a private bridge, for end-to-end tests.

:func:`make_lan` builds ``n`` hosts. Each host is a network namespace whose ``eth0`` (one end of
a veth pair) sits on a bridge of its own, with an address in a random ``10.231.N.0/24`` that no
interface of the machine uses. Only that bridge carries traffic: the bridge has no address in the
root namespace and nothing is forwarded or NATed, so hosts reach each other and nothing else.
Multicast works (snooping is off on the bridge, each host routes ``224.0.0.0/4`` to ``eth0``), so
mDNS/zeroconf discovery runs for real. :meth:`Lan.shape` limits a host's link with ``tc tbf`` in
both directions; :meth:`Lan.sshd` runs a real OpenSSH server inside a host.

Namespaces isolate the network only; **the filesystem is shared**. Each host therefore gets a
private ``HOME`` (with ``XDG_*`` dirs) and a short ``TMPDIR`` via :meth:`Host.env`, and every Ray
process started in a host must be given its own ``--temp-dir`` (``host.tmp``, short because Ray's
unix sockets need paths under ~100 chars) and ``--node-ip-address`` (``host.ip``): Ray would
otherwise share one session directory across "machines" and guess an address per host name,
which all hosts share too. :meth:`Host.spawn` also puts a process in a PID namespace of its own
by default (it is pid 1 there and sees only its own descendants), so a "machine" ends as a whole.

Stopping: a spawned process runs in its own process group; :meth:`Lan.stop` sends SIGTERM to the
group, waits, then SIGKILLs the group. A PID namespace's pid 1 gets a signal only if it handles it
(the kernel drops the rest, even from root), so a pid-1 program without a SIGTERM handler (plain
``sleep``, a Python script that does not install one) is killed only after the grace period. When
pid 1 dies the kernel kills everything else in its PID namespace, including processes that left
the group with ``setsid`` (verified in ``test_netns_lan.py``). Processes that escaped anyway
(``pidns=False`` and daemonized) are killed by :meth:`Lan.close` before it deletes their namespace.

Zeroconf (python-zeroconf 0.154) finds peers across namespaces both with its default
``InterfaceChoice.All`` and with ``Zeroconf(interfaces=[host.ip])`` (tried both ways, advertiser
and browser alike); the tests use the explicit form, which binds the one LAN interface and not
``lo``. Measured on a 2-core VM: ``register_service`` returns about 1.65 s after ``Zeroconf()``
(it blocks through probing and announcing), a browser on another host sees the advert about
1.3 s after the advertiser process is spawned (before ``register_service`` has returned), and sees
the removal about 0.4 s after the advertiser gets SIGTERM and unregisters (goodbye packets).

Cleanup runs on every path: :func:`make_lan` closes in ``finally``, an ``atexit`` hook closes what
is still open, and every new LAN first calls :func:`cleanup_stale`, which removes namespaces,
links and work dirs left by crashed runs (their owner pid, recorded in ``/tmp/tfl-XXXXXX/owner``,
is dead). Every name starts with ``tfl`` and six random hex chars, so nothing else is touched.

Where bridged traffic is filtered (``br_netfilter`` loaded and an iptables ``FORWARD`` policy of
DROP, as Docker sets up), hosts cannot reach each other; these tests then fail at the ping test.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import os
import pwd
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Final

import pytest

__all__ = [
    "CommandFailed", "Host", "Lan", "SshAccess", "Spawned", "cleanup_stale", "lan", "lan_factory",
    "make_lan", "netns_unavailable",
]

log = logging.getLogger("tilefleet.tests.netns")

PREFIX: Final = "tfl"
TMP_ROOT: Final = Path("/tmp")  # not $TMPDIR: Ray's socket paths under host.tmp must stay short
SSHD: Final = Path("/usr/sbin/sshd")
STOP_TIMEOUT_S: Final = 10.0
_IFACE: Final = "eth0"  # the host's end of its veth pair, inside its namespace


class CommandFailed(subprocess.CalledProcessError):
    """A command exited non-zero; unlike the base class, ``str()`` shows its output."""

    def __str__(self) -> str:
        return (f"`{shlex.join(str(a) for a in self.cmd)}` exited with {self.returncode}\n"
                f"--- stdout ---\n{self.stdout or ''}--- stderr ---\n{self.stderr or ''}")


def _run(argv: Sequence[str | os.PathLike[str]], *, check: bool = True, timeout: float = 30,
         env: Mapping[str, str] | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    argv = [str(a) for a in argv]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, input=input)
    if check and res.returncode != 0:
        raise CommandFailed(res.returncode, argv, res.stdout, res.stderr)
    return res


# --- Availability ---------------------------------------------------------------------------------


@cache
def netns_unavailable() -> str | None:
    """None when LANs can be built here; else why not, ready for ``pytest.skip``."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the netns tier as root)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            return f"no `{tool}` on PATH (apt-get install {package})"
    # Every kernel feature a LAN uses, probed in throwaway namespaces that vanish with the probe.
    probe = ("ip link add name tflbr type bridge && ip link add name tflv0 type veth peer name tflv1 && "
             "tc qdisc add dev tflv0 root tbf rate 1mbit burst 32kb latency 50ms")
    try:
        _run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "sh", "-ec", probe], timeout=20)
    except (CommandFailed, subprocess.TimeoutExpired, OSError) as e:
        return f"cannot build network/PID namespaces with a bridge, veths and tbf here: {e}"
    return None


# --- Hosts ----------------------------------------------------------------------------------------


class Spawned(subprocess.Popen[bytes]):
    """A process started by :meth:`Host.spawn`; its output (stdout and stderr) is in ``log_path``."""

    log_path: Path


@dataclass
class Host:
    """One "machine" on the LAN: a network namespace with its own address, HOME and TMPDIR."""

    name: str
    ns: str
    ip: str
    home: Path
    tmp: Path
    _lan: Lan = field(repr=False, compare=False)

    def private_env(self) -> dict[str, str]:
        """What sets this host apart from the others: HOME, XDG dirs, TMPDIR (and no usage stats)."""
        return {
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_STATE_HOME": str(self.home / ".local" / "state"),
            "TMPDIR": str(self.tmp),
            "RAY_USAGE_STATS_ENABLED": "0",
        }

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """This process's environment as this host sees it: :meth:`private_env` and ``extra`` on top."""
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)  # the test runner's cluster is not this host's business
        env.update(self.private_env())
        env.update(extra or {})
        return env

    def spawn(self, argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str] | None = None,
              pidns: bool = True, name: str | None = None) -> Spawned:
        """Start ``argv`` in this host, in a new process group (and PID namespace if ``pidns``).

        ``env`` is the whole environment (default :meth:`env`). Output goes to ``log_path``; the
        LAN stops the process on :meth:`Lan.close`, or earlier with :meth:`Lan.stop`.
        """
        return self._lan._spawn(self, argv, env, pidns, name)

    def run(self, argv: Sequence[str | os.PathLike[str]], *, env: Mapping[str, str] | None = None,
            timeout: float = 60, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a short command in this host's network namespace and capture its text output.

        Raises :class:`CommandFailed` (with the output) on a non-zero exit if ``check``.
        """
        return _run(["ip", "netns", "exec", self.ns, *argv], env=self.env() if env is None else env,
                    timeout=timeout, check=check, input=input)

    def log(self, proc: Spawned) -> str:
        """What a spawned process has written so far (for assertion messages)."""
        return proc.log_path.read_text(errors="replace")

    def ping(self, ip: str, *, timeout: float = 2.0) -> float | None:
        """Round-trip seconds of one ICMP echo to ``ip`` from this host, or None without a reply.

        Done with a raw socket in Python, since ``ping`` itself is often not installed.
        """
        res = self.run([sys.executable, "-c", _PING, ip, str(timeout)], timeout=timeout + 30, check=False)
        return float(res.stdout) if res.returncode == 0 else None


_PING: Final = r"""
import os, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
ident = os.getpid() & 0xFFFF
def checksum(b):
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    s = (s >> 16) + (s & 0xFFFF)
    return ~(s + (s >> 16)) & 0xFFFF
body = b"tilefleet-ping"
pkt = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + body
pkt = pkt[:2] + struct.pack("!H", checksum(pkt)) + pkt[4:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
start = time.monotonic()
try:
    s.sendto(pkt, (dst, 0))
    while (left := start + timeout - time.monotonic()) > 0:
        s.settimeout(left)
        data, (src, _) = s.recvfrom(2048)
        icmp = data[(data[0] & 0x0F) * 4:]
        if src == dst and icmp[0] == 0 and struct.unpack("!H", icmp[4:6])[0] == ident:
            print(time.monotonic() - start)
            sys.exit(0)
except OSError:
    pass  # unreachable network or timeout: no reply
sys.exit(1)
"""


@dataclass
class SshAccess:
    """How to ssh into a host running :meth:`Lan.sshd`. ``ssh_options`` are ``-o`` flags (with
    the ``-o``), usable with ``ssh``, ``scp`` and ``sftp``; the host key is in ``known_hosts``."""

    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path
    ssh_options: list[str]

    def argv(self, *remote: str) -> list[str]:
        """A complete ``ssh`` command line running ``remote`` on the host (no config files read)."""
        return ["ssh", "-F", "none", "-i", str(self.key), "-p", str(self.port), *self.ssh_options,
                f"{self.user}@{self.host}", *remote]


# --- The LAN --------------------------------------------------------------------------------------


_OPEN: set[Lan] = set()


@atexit.register
def _close_open_lans() -> None:
    for lan in list(_OPEN):  # the last resort when a test run ends without closing a LAN
        lan.close()


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/PID/stat`` (state first), or None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()  # after comm (field 2), which may contain spaces


def _process_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of ``pid``; with the pid it names a process for good."""
    stat = _stat(pid)
    return None if stat is None else stat[19]  # field 22


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a killed orphan stays one until init reaps it)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def _group_alive(proc: subprocess.Popen[bytes]) -> bool:
    proc.poll()  # reap the leader: a zombie leader still counts as a member of its group
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return False
    return True


def _killpg(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _pick_subnet() -> ipaddress.IPv4Network:
    used = [ipaddress.ip_interface(m).network
            for m in re.findall(r"\binet (\S+)", _run(["ip", "-4", "-o", "addr"]).stdout)]
    candidates = (ipaddress.IPv4Network(f"10.231.{n}.0/24") for n in range(256))
    free = [net for net in candidates if not any(net.overlaps(u) for u in used)]
    if not free:
        raise RuntimeError("every 10.231.N.0/24 overlaps an address of this machine")
    return random.choice(free)


class Lan:
    """Hosts on one bridge; build it with :func:`make_lan` (or the ``lan``/``lan_factory`` fixtures)."""

    def __init__(self, n: int = 3) -> None:
        if not 1 <= n <= 200:
            raise ValueError(f"a LAN has 1..200 hosts, got {n}")
        cleanup_stale()
        net = _pick_subnet()
        while True:  # claim a token: its work dir exists once, so two runs never share names
            token = secrets.token_hex(3)
            workdir = TMP_ROOT / f"{PREFIX}-{token}"
            try:
                workdir.mkdir(mode=0o755)
                break
            except FileExistsError:
                continue
        # Written before any namespace or link exists, so cleanup_stale never sees them unowned.
        (workdir / "owner").write_text(f"{os.getpid()} {_process_start(os.getpid())}\n")
        self.workdir = workdir
        self.token = token
        self.bridge = f"{PREFIX}{token}-br"  # 12 chars: interface names are at most 15
        self.subnet = str(net)
        self.hosts: list[Host] = []
        self._veths: dict[str, str] = {}  # host name -> its veth end on the bridge
        self._procs: list[Spawned] = []
        self._ssh: dict[str, SshAccess] = {}
        self._closed = False
        self._spawned = 0
        _OPEN.add(self)
        try:
            self._build(n, net)
        except BaseException:
            self.close()
            raise

    def _build(self, n: int, net: ipaddress.IPv4Network) -> None:
        _run(["ip", "link", "add", self.bridge, "type", "bridge", "mcast_snooping", "0"])
        self._no_ipv6(self.bridge)
        _run(["ip", "link", "set", self.bridge, "up"])
        for i in range(n):
            name, ns, veth = f"h{i}", f"{PREFIX}{self.token}-h{i}", f"{PREFIX}{self.token}-v{i}"
            ip = str(net.network_address + 10 + i)
            _run(["ip", "netns", "add", ns])
            # The peer is born inside the namespace, so naming it eth0 clashes with nothing here.
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", _IFACE, "netns", ns])
            self._veths[name] = veth
            self._no_ipv6(veth)
            _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
            for cmd in (["link", "set", "lo", "up"],
                        ["addr", "add", f"{ip}/{net.prefixlen}", "dev", _IFACE],
                        ["link", "set", _IFACE, "up"],
                        ["route", "add", "224.0.0.0/4", "dev", _IFACE]):  # multicast (mDNS) out of eth0
                _run(["ip", "-n", ns, *cmd])
            home, tmp = self.workdir / "home" / name, self.workdir / name
            for d in (home / ".cache", home / ".config", home / ".local" / "state", tmp):
                d.mkdir(parents=True)
            self.hosts.append(Host(name, ns, ip, home, tmp, self))

    @staticmethod
    def _no_ipv6(iface: str) -> None:
        """No link-local address either: the root namespace keeps no address on this LAN."""
        knob = Path(f"/proc/sys/net/ipv6/conf/{iface}/disable_ipv6")
        if knob.exists():
            knob.write_text("1")

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def veth(self, host: Host) -> str:
        """The bridge-side end of ``host``'s link, in the root namespace (``eth0`` is the other)."""
        return self._veths[host.name]

    def __repr__(self) -> str:
        return f"Lan({self.bridge}, {self.subnet}, {[h.ip for h in self.hosts]})"

    # -- traffic shaping -----------------------------------------------------------------------------
    def shape(self, host: Host, rate_mbit: float, *, burst_kb: int = 32, latency_ms: int = 50) -> None:
        """Limit ``host``'s link to ``rate_mbit`` Mbit/s each way (``tc tbf`` on both veth ends)."""
        if rate_mbit <= 0:
            raise ValueError(f"rate must be > 0 Mbit/s, got {rate_mbit}")
        tbf = ["tbf", "rate", f"{round(rate_mbit * 1e6)}bit", "burst", f"{burst_kb}kb", "latency", f"{latency_ms}ms"]
        _run(["tc", "-n", host.ns, "qdisc", "replace", "dev", _IFACE, "root", *tbf])  # egress from the host
        _run(["tc", "qdisc", "replace", "dev", self.veth(host), "root", *tbf])  # egress towards it

    def unshape(self, host: Host) -> None:
        """Remove :meth:`shape`'s limits (a no-op where there are none)."""
        for ns_args, dev in ((["-n", host.ns], _IFACE), ([], self.veth(host))):
            if " tbf " in _run(["tc", *ns_args, "qdisc", "show", "dev", dev, "root"]).stdout:
                _run(["tc", *ns_args, "qdisc", "del", "dev", dev, "root"])

    # -- processes -----------------------------------------------------------------------------------
    def _spawn(self, host: Host, argv: Sequence[str | os.PathLike[str]], env: Mapping[str, str] | None,
               pidns: bool, name: str | None) -> Spawned:
        if self._closed:
            raise RuntimeError(f"{self!r} is closed")
        self._spawned += 1
        log_path = self.workdir / f"{host.name}-{name or self._spawned}.log"
        if log_path.exists():  # a name used twice keeps both logs
            log_path = log_path.with_name(f"{host.name}-{name}-{self._spawned}.log")
        wrap = ["unshare", "--pid", "--fork", "--mount-proc"] if pidns else []
        with open(log_path, "wb") as out:
            proc = Spawned(["ip", "netns", "exec", host.ns, *wrap, *map(str, argv)], stdin=subprocess.DEVNULL,
                           stdout=out, stderr=subprocess.STDOUT, env=host.env() if env is None else dict(env),
                           start_new_session=True)
        proc.log_path = log_path
        self._procs.append(proc)
        return proc

    def stop(self, *procs: Spawned, timeout: float = STOP_TIMEOUT_S) -> None:
        """End spawned processes: SIGTERM their groups, wait up to ``timeout`` s, then SIGKILL.

        Processes that ignore SIGTERM (see the module notes on pid 1) take the whole ``timeout``.
        """
        for p in procs:
            _killpg(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while any(_group_alive(p) for p in procs) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in procs:
            if _group_alive(p):
                _killpg(p, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while (alive := [p for p in procs if _group_alive(p)]) and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in alive:
            log.warning("process group %d (%s) survived SIGKILL", p.pid, p.args)
        for p in procs:
            if p in self._procs:
                self._procs.remove(p)

    # -- ssh -----------------------------------------------------------------------------------------
    def sshd(self, host: Host) -> SshAccess:
        """Run OpenSSH's sshd in ``host`` (key login for the current user) and check that it works.

        Sessions get the host's HOME, XDG dirs and TMPDIR (``SetEnv``) and run in sshd's PID and
        mount namespaces, where the user's passwd home is the host's HOME (a bind mount).
        """
        if host.name in self._ssh:
            return self._ssh[host.name]
        if not SSHD.exists():
            pytest.skip("needs OpenSSH's sshd (apt-get install openssh-server)")
        if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
            pytest.skip("needs OpenSSH's ssh and ssh-keygen (apt-get install openssh-client)")
        d = self.workdir / "ssh"
        d.mkdir(exist_ok=True)
        client_key, host_key = d / "client_ed25519", d / f"{host.name}_host_ed25519"
        if not client_key.exists():  # one client key for the whole LAN
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "tilefleet-netns", "-f", client_key])
            (d / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name, "-f", host_key])
        known_hosts = d / "known_hosts"
        key_type, key_b64 = host_key.with_suffix(".pub").read_text().split()[:2]
        with known_hosts.open("a") as f:
            f.write(f"{host.ip} {key_type} {key_b64}\n")
        session_env = " ".join(f"{k}={v}" for k, v in host.private_env().items())
        config = d / f"{host.name}_sshd_config"
        config.write_text(
            f"ListenAddress {host.ip}\nPort 22\nHostKey {host_key}\nPidFile {d / f'{host.name}_sshd.pid'}\n"
            f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nStrictModes no\nUsePAM no\n"
            f"SetEnv {session_env}\nSubsystem sftp internal-sftp\n"  # scp speaks sftp since OpenSSH 9
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        # The login user's home (from passwd) is this host's private HOME, bind-mounted in the mount
        # namespace of sshd's PID namespace (private propagation: nothing leaks out): programs that
        # find the home through passwd, not $HOME (ssh's `-i ~/key`, as Ray's monitor passes it),
        # then see this host's files, as on a separate machine.
        # The Python this venv runs on may itself live under the real home (pyenv): that directory is
        # bound into the host's home first, so it stays where it was.
        real_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
        script = ""
        python = Path(os.path.realpath(sys.executable))
        if python.is_relative_to(real_home):
            keep = python.relative_to(real_home).parts[0]
            (host.home / keep).mkdir(exist_ok=True)
            script += f'mount --bind "$2/{keep}" "$1/{keep}" && '
        script += 'mount --rbind "$1" "$2" && exec "$3" -D -e -f "$4"'
        proc = host.spawn(["sh", "-c", script, "sshd", host.home, real_home, SSHD, config], name="sshd")
        user = pwd.getpwuid(os.getuid()).pw_name
        options = [f"UserKnownHostsFile={known_hosts}", "GlobalKnownHostsFile=/dev/null", "StrictHostKeyChecking=yes",
                   "IdentitiesOnly=yes", "BatchMode=yes", "ConnectTimeout=5"]
        access = SshAccess(host=host.ip, port=22, user=user, key=client_key, known_hosts=known_hosts,
                           ssh_options=[arg for o in options for arg in ("-o", o)])
        # The root namespace has no address on the bridge: log in from another host, as a peer would.
        client = next((h for h in self.hosts if h is not host), host)
        deadline = time.monotonic() + 15
        while (res := client.run(access.argv("true"), timeout=20, check=False)).returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd in {host.name} is not usable: {res.stderr.strip()}\n"
                                   f"--- sshd log ---\n{host.log(proc)}")
            time.sleep(0.1)
        self._ssh[host.name] = access
        return access

    # -- teardown ------------------------------------------------------------------------------------
    def close(self) -> None:
        """End every spawned process, delete namespaces, links and the work dir. Idempotent; logs
        problems instead of raising, so it is safe in ``finally`` and at exit."""
        if self._closed:
            return
        self._closed = True
        _OPEN.discard(self)
        try:
            self.stop(*self._procs)
        except Exception:
            log.exception("stopping the processes of %r", self)
        try:
            _remove_token(self.token, PREFIX)
        except Exception:
            log.exception("removing %r", self)


def _remove_token(token: str, prefix: str) -> list[str]:
    """Delete everything named for ``token``: processes in its namespaces, the namespaces, links
    (qdiscs go with their links) and the work dir. Logs failures; returns what it removed."""
    removed: list[str] = []
    name_re = re.compile(rf"{re.escape(prefix)}{token}-(?:br|v\d+|h\d+)")
    for ns in _netns_names():
        if not name_re.fullmatch(ns):
            continue
        pids = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        for pid in pids:  # escaped the process groups (pidns=False and setsid): still ours
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while any(_running(int(p)) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        removed.append(ns)
        _quiet(["ip", "netns", "del", ns])
    # Deleting a veth deletes its peer, even inside a namespace that lingers for a stuck process.
    for link in sorted(_link_names(), key=lambda n: n.endswith("-br")):
        if name_re.fullmatch(link):
            removed.append(link)
            # the kernel removes a deleted namespace's veth pairs asynchronously: one listed a moment
            # ago may be gone by now, which is what we wanted
            if _run(["ip", "link", "del", link], check=False).returncode and link in _link_names():
                log.warning("cleanup step failed: could not delete link %s", link)
    workdir = TMP_ROOT / f"{prefix}-{token}"
    if workdir.is_dir():
        removed.append(str(workdir))
        try:  # the owner file goes last, so a crash in here still leaves the rest findable
            for child in workdir.iterdir():
                if child.name == "owner":
                    continue
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            (workdir / "owner").unlink(missing_ok=True)
            workdir.rmdir()
        except OSError:
            log.exception("removing %s", workdir)
    return removed


def _quiet(argv: list[str]) -> None:
    try:
        _run(argv)
    except (CommandFailed, subprocess.TimeoutExpired) as e:
        log.warning("cleanup step failed: %s", e)


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _run(["ip", "netns", "list"]).stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    # "7: tfl0a1b2c-v0@if2: <...>": the name is the second field, without its "@peer" suffix.
    return [line.split(": ")[1].split("@")[0] for line in _run(["ip", "-o", "link"]).stdout.splitlines()]


def cleanup_stale(prefix: str = PREFIX) -> list[str]:
    """Remove what crashed runs of this fixture left: namespaces, links and work dirs named
    ``<prefix><6 hex>-...`` / ``/tmp/<prefix>-<6 hex>`` whose owner process is gone. A LAN whose
    owner lives (another test run, right now) is left alone. Returns the names removed."""
    tokens: set[str] = set()
    name_re = re.compile(rf"{re.escape(prefix)}([0-9a-f]{{6}})-(?:br|v\d+|h\d+)")
    try:
        for name in [*_netns_names(), *_link_names()]:
            if m := name_re.fullmatch(name):
                tokens.add(m[1])
    except (CommandFailed, subprocess.TimeoutExpired, OSError) as e:
        log.warning("cannot list namespaces and links for stale cleanup: %s", e)
    dir_re = re.compile(rf"{re.escape(prefix)}-([0-9a-f]{{6}})")
    tokens.update(m[1] for d in TMP_ROOT.glob(f"{prefix}-*") if (m := dir_re.fullmatch(d.name)))
    removed: list[str] = []
    for token in sorted(tokens):
        owner = TMP_ROOT / f"{prefix}-{token}" / "owner"
        try:
            pid, start = owner.read_text().split()
            if _process_start(int(pid)) == start:
                continue
        except FileNotFoundError:
            if owner.parent.is_dir():
                continue  # a run between mkdir and writing its owner file: not stale
        except (OSError, ValueError):
            pass  # unreadable owner: its run is long gone
        try:
            removed += _remove_token(token, prefix)
        except Exception:
            log.exception("removing stale netns test LAN %s%s", prefix, token)
    if removed:
        log.warning("removed leftovers of crashed netns test runs: %s", ", ".join(removed))
    return removed


@contextmanager
def make_lan(n: int = 3, *, shaped: Mapping[int, float] | None = None) -> Iterator[Lan]:
    """A LAN of ``n`` hosts, closed on exit; ``shaped`` maps host index to a rate in Mbit/s."""
    lan = Lan(n)
    try:
        for i, rate in (shaped or {}).items():
            lan.shape(lan[i], rate)
        yield lan
    finally:
        lan.close()


# --- pytest fixtures ------------------------------------------------------------------------------


def _skip_if_unavailable() -> None:
    if (reason := netns_unavailable()) is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    """Three unshaped hosts shared by a test module; stop what you spawn (:meth:`Lan.stop`)."""
    _skip_if_unavailable()
    with make_lan(3) as built:
        yield built


@pytest.fixture
def lan_factory() -> Iterator[Callable[..., Lan]]:
    """``lan_factory(n=3, shaped=None)`` builds a fresh LAN; all are closed after the test."""
    _skip_if_unavailable()
    with ExitStack() as stack:
        def factory(n: int = 3, shaped: Mapping[int, float] | None = None) -> Lan:
            return stack.enter_context(make_lan(n, shaped=shaped))

        yield factory
