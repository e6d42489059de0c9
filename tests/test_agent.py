"""The head's agent on a real localhost socket: info, the mutual challenge, probes, and bad input."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest

from fleet.lan import discovery as d
from fleet.lan import tokens as tk
from fleet.lan.agent import (
    MAX_FRAME, Agent, AgentClient, AgentRefused, AgentUnreachable, HeadNotProven, encode_frame, read_frame,
)
from fleet.lan.discovery import HeadAdvert

TOKEN = b"0123456789abcdef0123456789abcdef-agent-token"
OTHER = b"fedcba9876543210fedcba9876543210-other-token"
DEVICES = [{"node_id": "ab" * 28, "ip": "10.0.0.5", "alive": True, "state": "alive", "is_head": True,
            "labels": {"tilefleet/name": "head"}, "cpus": 2.0, "gpus": 0.0, "memory_bytes": 1, "tiles_done": 3}]


def advert(token: bytes = TOKEN) -> HeadAdvert:
    return HeadAdvert(cluster_name="lab", cluster_id="0123456789abcdef0123456789abcdef", host="127.0.0.1",
                      ray_port=6379, agent_port=6390, tilefleet_version="0.1.0", wire_version=d.WIRE_VERSION,
                      ray_version="2.60.0", python_version="3.11.7", token_fingerprint=tk.token_fingerprint(token))


def _start(token: bytes | None, devices: Any = lambda: DEVICES) -> Agent:
    a = Agent(advert(), token, devices, host="127.0.0.1", port=0)
    a.start()
    return a


@pytest.fixture
def agent() -> Iterator[Agent]:
    a = _start(TOKEN)
    yield a
    a.close()


def client(a: Agent) -> AgentClient:
    return AgentClient(*a.address, timeout=5)


def raw(a: Agent) -> socket.socket:
    s = socket.create_connection(a.address, timeout=5)
    return s


def test_info_is_the_advert_without_auth(agent: Agent) -> None:
    with client(agent) as c:
        assert c.info() == advert()


def test_mutual_proof_unlocks_devices(agent: Agent) -> None:
    with client(agent) as c:
        assert c.devices(TOKEN) == DEVICES
        assert c.proven


def test_head_with_another_token_fails_the_challenge() -> None:
    rogue = _start(OTHER)  # advertises TOKEN's fingerprint, holds another token
    try:
        with client(rogue) as c, pytest.raises(HeadNotProven, match="failed the join challenge.*rogue"):
            c.prove_head(TOKEN)
    finally:
        rogue.close()


def test_device_with_wrong_token_is_refused_and_agent_keeps_serving(agent: Agent) -> None:
    with raw(agent) as s:
        s.sendall(encode_frame({"op": "challenge", "nonce": tk.new_nonce()}))
        reply = read_frame(s, 2**20)
        assert reply["ok"] and len(reply["nonce2"]) == 32
        s.sendall(encode_frame({"op": "prove", "mac": tk.device_response(OTHER, reply["nonce2"])}))
        bad = read_frame(s, 2**20)
        assert bad["ok"] is False and "device proof failed" in bad["error"]
        assert s.recv(1) == b""  # closed
    with client(agent) as c:
        assert c.devices(TOKEN) == DEVICES


@pytest.mark.parametrize("op", ["devices", "probe_down", "probe_up"])
def test_privileged_ops_need_the_proof(agent: Agent, op: str) -> None:
    fields = {"bytes": 10} if op.startswith("probe") else {}
    with client(agent) as c:
        with pytest.raises(AgentRefused, match="needs the device's proof"):
            c.call(op, **fields)
        with pytest.raises(AgentRefused, match="device proof failed"):
            c.call("prove", mac=bytes(32))  # no challenge was sent: nothing to prove against


def test_probe_and_ping_give_sane_figures(agent: Agent) -> None:
    with client(agent) as c:
        c.prove_head(TOKEN)
        assert 0 < c.ping() < 1
        link = c.probe(pings=5, budget_s=0.4, first_bytes=64 * 1024, max_bytes=1 << 20)
        assert link.down_mbps > 1 and link.up_mbps > 1 and 0 < link.latency_ms < 500


def _exchange(s: socket.socket, payload: bytes) -> dict[str, Any]:
    s.sendall(payload)
    return read_frame(s, 2**20)


def _frame_raw(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(("payload", "fragment", "closes"), [
    (_frame_raw(b"\xc1\xc1garbage"), "not valid msgpack", True),
    (struct.pack(">I", MAX_FRAME + 1), "larger than", True),
    (_frame_raw(msgpack.packb([1, 2, 3])), "must be a msgpack map", True),
    (encode_frame({"op": "explode"}), "unknown op", False),
    (encode_frame({"nop": 1}), "unknown op", False),
    (encode_frame({"op": "challenge", "nonce": "text, not bytes"}), "must be bytes", False),
    (encode_frame({"op": "challenge", "nonce": b"short"}), "nonce must be", False),
    (encode_frame({"op": "challenge"}), "needs field 'nonce'", False),
    (encode_frame({"op": "info", "extra": 1}), "unexpected ['extra']", False),
    (encode_frame({"op": "prove", "mac": b"x" * 31}), "mac must be 32 bytes", False),
    (encode_frame({"op": "probe_down", "bytes": True}), "must be int", False),
], ids=["garbage", "oversized", "not-a-map", "unknown-op", "no-op", "nonce-type", "nonce-size", "missing-field",
        "extra-field", "mac-size", "bool-for-int"])
def test_malformed_requests_get_errors_and_the_agent_serves_on(
        agent: Agent, payload: bytes, fragment: str, closes: bool) -> None:
    with raw(agent) as s:
        reply = _exchange(s, payload)
        assert reply["ok"] is False and fragment in reply["error"]
        if closes:
            assert s.recv(1) == b""
        else:  # a well-framed bad request leaves the connection usable
            assert _exchange(s, encode_frame({"op": "info"}))["ok"] is True
    with client(agent) as c:
        assert c.info().cluster_name == "lab"


def test_oversized_probe_is_refused(agent: Agent) -> None:
    with client(agent) as c:
        c.prove_head(TOKEN)
        with pytest.raises(AgentRefused, match="probe size"):
            c.call("probe_down", bytes=(16 << 20) + 1)


def test_half_a_message_then_close_does_not_hurt(agent: Agent) -> None:
    with raw(agent) as s:
        s.sendall(struct.pack(">I", 100) + b"abc")
    with client(agent) as c:
        assert c.info().cluster_name == "lab"


def test_failing_device_list_is_an_error_reply() -> None:
    def broken() -> list[dict[str, Any]]:
        raise ConnectionError("GCS unavailable")

    a = _start(TOKEN, broken)
    try:
        with client(a) as c:
            with pytest.raises(AgentRefused, match="cannot list the cluster's nodes.*GCS unavailable"):
                c.devices(TOKEN)
            assert c.info().cluster_name == "lab"
    finally:
        a.close()


def test_insecure_agent_needs_an_insecure_device() -> None:
    a = _start(None)
    try:
        with client(a) as c, pytest.raises(HeadNotProven, match="runs without a token"):
            c.prove_head(TOKEN)
        with client(a) as c:
            assert c.devices(None, insecure=True) == DEVICES
    finally:
        a.close()
    secure = _start(TOKEN)
    try:
        with client(secure) as c, pytest.raises(HeadNotProven, match="requires a token"):
            c.prove_head(None, insecure=True)
    finally:
        secure.close()


def test_unreachable_agent_is_a_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(AgentUnreachable, match=f"no tilefleet agent at 127.0.0.1:{port} .connection refused"):
            AgentClient("127.0.0.1", port, timeout=2).info()


def test_busy_port_fails_at_construction() -> None:
    a = _start(TOKEN)
    try:
        with pytest.raises(OSError):
            Agent(advert(), TOKEN, lambda: [], host="127.0.0.1", port=a.address[1])
    finally:
        a.close()
