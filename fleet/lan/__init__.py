"""A real LAN cluster: ``tilefleet head``, ``join``, ``leave``, ``stop`` and the LAN ``devices``.

The decisions are pure functions tested on their own: where state and tokens live, reading and
creating the join token, Ray's label syntax, the ``ray start`` command lines, version checks
with what to install, state files that survive a crash (a dead pid is stale), and which address
this node has. The glue below them is thin: a ``ray start --block`` child in its own process
group (Ray 2.60 drains and stops its own processes on SIGTERM; whatever survives is killed by
pid), the agent (:mod:`fleet.lan.agent`) and the zeroconf advert (:mod:`fleet.lan.discovery`).

Token authentication is Ray's own (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` in the
environment of every ``ray start``, the head's included: a node or driver without the token is
refused with ``InvalidAuthToken``); the same token keys the agent's mutual challenge, so a device
proves a head before it joins, and a head proves a device before it lists the cluster.

Rooms: :mod:`~fleet.lan.state` (where things live, state files), :mod:`~fleet.lan.tokens` (the join
token, HMAC challenges), :mod:`~fleet.lan.discovery` (zeroconf adverts), :mod:`~fleet.lan.agent`
(the head's agent and its client), :mod:`~fleet.lan.trust` (the one check of a head before joining),
:mod:`~fleet.lan.raynode` (labels, ``ray start`` lines, the GCS), :mod:`~fleet.lan.procs`,
:mod:`~fleet.lan.node` (the head process, restarting in place) and :mod:`~fleet.lan.member` (the join
process, rejoining a restarted head), :mod:`~fleet.lan.tls` (the head's CA, device certificates,
Ray's TLS environment), :mod:`~fleet.lan.service` (systemd units), :mod:`~fleet.lan.net`
(addresses, ports), :mod:`~fleet.lan.profiling` (this device's speed), :mod:`~fleet.lan.clusterconfig`
(``ray up``).
This ``__init__`` re-exports the names a caller needs as ``fleet.lan.X``; modules inside the
package import each other directly, never through it.
"""

from __future__ import annotations

from .net import choose_node_ip, local_ips, pick_ip, port_free
from .procs import (START_TIMEOUT_S, STOP_TIMEOUT_S, Stopper, log_tail, own_identity, pid_alive, pids_with,
                    start_child, terminate)
from .raynode import (DEFAULT_AGENT_PORT, DEFAULT_RAY_PORT, HEALTH_CHECKS, check_cluster_name, cluster_id,
                      default_cluster_name, device_labels, drain, encode_labels, label_number, label_text,
                      ray_env, ray_executable, ray_head_argv, ray_node_argv, use_ray_auth)
from .state import LanError, config_dir, default_token_path, ray_temp_dir, read_state, remove_state, state_dir, write_state
from .tokens import Token, create_token, load_token, resolve_token
from .trust import check_head, fingerprint_mismatch, local_versions, pick_head, version_mismatch

__all__ = [
    "DEFAULT_AGENT_PORT", "DEFAULT_RAY_PORT", "HEALTH_CHECKS", "START_TIMEOUT_S", "STOP_TIMEOUT_S", "LanError",
    "Stopper", "Token", "check_cluster_name", "check_head", "choose_node_ip", "cluster_id", "config_dir",
    "create_token", "default_cluster_name", "default_token_path", "device_labels", "drain", "encode_labels",
    "fingerprint_mismatch", "label_number", "label_text", "load_token", "local_ips", "local_versions", "log_tail",
    "own_identity", "pick_head", "pick_ip", "pid_alive", "pids_with", "port_free", "ray_env", "ray_executable",
    "ray_head_argv", "ray_node_argv", "ray_temp_dir", "read_state", "remove_state", "resolve_token", "start_child",
    "state_dir", "terminate", "use_ray_auth", "version_mismatch", "write_state",
]
