"""Discovery without multicast: adverts, the join challenge and the registry, fed injected records."""

from __future__ import annotations

import logging
import socket
from dataclasses import replace
from typing import Any

import pytest
import zeroconf

from fleet.lan import discovery as d
from fleet.lan import tokens as tk
from fleet.lan.discovery import AmbiguousHead, BadAdvert, HeadAdvert, HeadRegistry, NoHeadFound

TOKEN = b"s3cret-join-token-0123456789abcdef"


def advert(**kw: Any) -> HeadAdvert:
    base = dict(
        cluster_name="lab", cluster_id="0123456789abcdef0123456789abcdef", host="10.0.0.5", ray_port=6379,
        agent_port=7070, tilefleet_version="0.1.0", wire_version=d.WIRE_VERSION, ray_version="2.60.0",
        python_version="3.11.9", token_fingerprint=tk.token_fingerprint(TOKEN),
    )
    base.update(kw)
    return HeadAdvert(**base)


def txt_of(a: HeadAdvert, **override: Any) -> dict[bytes, Any]:
    """A TXT record as zeroconf hands it over: bytes keys and values."""
    t: dict[bytes, Any] = {k.encode(): v.encode() for k, v in a.to_txt().items()}
    for k, v in override.items():
        if v is _DROP:
            t.pop(k.encode(), None)
        else:
            t[k.encode()] = v.encode() if isinstance(v, str) else v
    return t


_DROP = object()


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def added(self, a: HeadAdvert) -> None:
        self.calls.append(("added", a))

    def updated(self, a: HeadAdvert) -> None:
        self.calls.append(("updated", a))

    def removed(self, cluster_id: str) -> None:
        self.calls.append(("removed", cluster_id))


# --- adverts ------------------------------------------------------------------------------------


def test_txt_round_trip_with_bytes_and_str_keys() -> None:
    a = advert()
    t = a.to_txt()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in t.items())
    assert "host" not in t and t["ray_port"] == "6379" and t["token_fingerprint"] == a.token_fingerprint
    assert HeadAdvert.from_txt(t, "10.0.0.5") == a
    assert HeadAdvert.from_txt(txt_of(a), "10.0.0.5") == a
    # DNS-SD keys are case-insensitive; unknown keys are ignored (later versions may add some)
    upper = {k.upper(): v for k, v in t.items()} | {"future_key": "x"}
    assert HeadAdvert.from_txt(upper, "10.0.0.5") == a


@pytest.mark.parametrize(
    ("override", "key", "fragment"),
    [
        ({"ray_port": "0"}, "ray_port", "1..65535"),
        ({"ray_port": "65536"}, "ray_port", "1..65535"),
        ({"agent_port": "http"}, "agent_port", "1..65535"),
        ({"ray_port": "-1"}, "ray_port", "integer port"),
        ({"token_fingerprint": "xyz"}, "token_fingerprint", "16..64"),
        ({"token_fingerprint": "ab" * 4}, "token_fingerprint", "hex"),
        ({"token_fingerprint": "a" * 65}, "token_fingerprint", "16..64"),
        ({"cluster_name": "lab with spaces"}, "cluster_name", "1..63 letters"),
        ({"cluster_name": "x" * 64}, "cluster_name", "1..63"),
        ({"ray_version": ""}, "ray_version", "no value"),
        ({"python_version": "3.11 beta"}, "python_version", "version string"),
        ({"wire_version": "one"}, "wire_version", "integer"),
        ({"tilefleet_version": "9" * 300}, "tilefleet_version", "at most 255"),
        ({"cluster_id": _DROP}, "cluster_id", "missing"),
        ({"ray_port": None}, "ray_port", "no value"),
        ({"ray_version": b"\xff\xfe"}, "ray_version", "UTF-8"),
    ],
)
def test_bad_adverts_name_the_key_and_what_is_accepted(override: dict[str, Any], key: str, fragment: str) -> None:
    with pytest.raises(BadAdvert) as e:
        HeadAdvert.from_txt(txt_of(advert(), **override), "10.0.0.5")
    assert e.value.key == key
    assert repr(key) in str(e.value) and fragment in str(e.value)
    assert isinstance(e.value, ValueError)


def test_missing_key_lists_what_an_advert_carries() -> None:
    with pytest.raises(BadAdvert, match="missing; a tilefleet advert carries cluster_name, cluster_id"):
        HeadAdvert.from_txt(txt_of(advert(), agent_port=_DROP), "10.0.0.5")


def test_bad_host_and_constructor_validation() -> None:
    with pytest.raises(BadAdvert, match="'host'.*IP address or a DNS host name"):
        HeadAdvert.from_txt(advert().to_txt(), "not a host!")
    assert HeadAdvert.from_txt(advert().to_txt(), "headbox.local").host == "headbox.local"
    with pytest.raises(BadAdvert, match="ray_port"):
        advert(ray_port=True)
    with pytest.raises(BadAdvert, match="wire_version"):
        advert(wire_version=0)


def test_fingerprint_hides_the_token() -> None:
    fp = tk.token_fingerprint(TOKEN)
    assert len(fp) == 16 and all(c in "0123456789abcdef" for c in fp)
    assert fp == tk.token_fingerprint(TOKEN) and fp != tk.token_fingerprint(TOKEN + b"x")
    for token in (TOKEN, b"0123456789abcdef", bytes.fromhex("00112233445566778899aabbccddeeff")):
        f = tk.token_fingerprint(token)
        assert f.encode() != token and f.encode() not in token and token.hex() not in f
        assert token.decode("latin-1") not in f and f not in token.hex()
    with pytest.raises(ValueError):
        tk.token_fingerprint(b"")


def test_challenge_response_verifies_and_detects_tampering() -> None:
    nonce = tk.new_nonce()
    assert len(nonce) == 32 and nonce != tk.new_nonce()
    resp = tk.challenge_response(TOKEN, nonce)
    assert len(resp) == 32 and TOKEN not in resp
    assert tk.verify_response(TOKEN, nonce, resp)
    assert not tk.verify_response(b"another-token", nonce, resp)  # a head without the token
    assert not tk.verify_response(TOKEN, tk.new_nonce(), resp)  # a replayed answer
    flipped = bytes([resp[0] ^ 1]) + resp[1:]
    assert not tk.verify_response(TOKEN, nonce, flipped)
    assert not tk.verify_response(TOKEN, nonce, resp[:-1])
    assert not tk.verify_response(TOKEN, nonce, "not bytes")  # type: ignore[arg-type]
    # domain separation: not a bare HMAC of the nonce
    import hashlib
    import hmac

    assert resp != hmac.new(TOKEN, nonce, hashlib.sha256).digest()
    with pytest.raises(ValueError, match="nonce"):
        tk.challenge_response(TOKEN, b"short")


def test_device_proof_is_apart_from_the_heads() -> None:
    """Distinct labels: neither side's answer can be reflected as the other's proof."""
    nonce = tk.new_nonce()
    proof = tk.device_response(TOKEN, nonce)
    assert len(proof) == 32 and proof != tk.challenge_response(TOKEN, nonce)
    assert tk.verify_device_response(TOKEN, nonce, proof)
    assert not tk.verify_device_response(TOKEN, nonce, tk.challenge_response(TOKEN, nonce))
    assert not tk.verify_response(TOKEN, nonce, proof)
    assert not tk.verify_device_response(b"another-token", nonce, proof)
    assert not tk.verify_device_response(TOKEN, nonce, "not bytes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonce"):
        tk.device_response(TOKEN, b"short")


# --- the registry ----------------------------------------------------------------------------------


NAME = "lab-01234567._tilefleet._tcp.local."


def test_registry_add_update_remove_calls_listeners() -> None:
    rec = Recorder()
    reg = HeadRegistry([rec])
    a = advert()
    reg.apply_add(NAME, txt_of(a), "10.0.0.5")
    assert rec.calls == [("added", a)] and reg.heads() == [a]
    reg.apply_update(NAME, txt_of(a), "10.0.0.5")  # a re-announcement changes nothing
    assert rec.calls == [("added", a)]
    b = replace(a, ray_port=6380)
    reg.apply_update(NAME, txt_of(b), "10.0.0.5")
    assert rec.calls[-1] == ("updated", b) and reg.heads() == [b]
    reg.apply_remove(NAME)
    assert rec.calls[-1] == ("removed", a.cluster_id) and reg.heads() == []
    reg.apply_remove(NAME)  # unknown names are ignored
    assert len(rec.calls) == 3


def test_registry_keys_by_cluster_id_not_service_name() -> None:
    rec = Recorder()
    reg = HeadRegistry()
    reg.add_listener(rec)
    a = advert()
    reg.apply_add(NAME, txt_of(a), "10.0.0.5")
    other = "lab-renamed._tilefleet._tcp.local."
    reg.apply_add(other, txt_of(a), "10.0.0.6")  # same head seen under a second name
    moved = replace(a, host="10.0.0.6")
    assert rec.calls == [("added", a), ("updated", moved)] and reg.heads() == [moved]
    reg.apply_remove(other)
    assert rec.calls[-1] == ("updated", a)
    # a service whose cluster id changes is a new head replacing the old one
    c = advert(cluster_id="ffffffffffffffff")
    reg.apply_update(NAME, txt_of(c), "10.0.0.5")
    assert rec.calls[-2:] == [("removed", a.cluster_id), ("added", c)]


def test_malformed_advert_is_ignored_with_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    reg = HeadRegistry([rec])
    bad = txt_of(advert(), ray_port="99999")
    with caplog.at_level(logging.WARNING, logger="fleet.lan.discovery"):
        reg.apply_add(NAME, bad, "10.0.0.5")
        reg.apply_update(NAME, bad, "10.0.0.5")  # repeated: not logged again
        reg.apply_add("junk._tilefleet._tcp.local.", {b"\xff": b"x"}, "10.0.0.9")
        reg.apply_add("junk2._tilefleet._tcp.local.", "not a mapping", "10.0.0.9")  # type: ignore[arg-type]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert NAME in lines[0] and "ray_port" in lines[0] and "1..65535" in lines[0]
    assert rec.calls == [] and reg.heads() == []
    reg.apply_update(NAME, txt_of(advert()), "10.0.0.5")  # fixed later: now it counts
    assert [c[0] for c in rec.calls] == ["added"]


def test_unknown_wire_version_is_ignored_with_the_understood_versions(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    reg = HeadRegistry([rec])
    future = {b"wire_version": b"2", b"cluster": b"lab"}  # a v2 head may use other keys entirely
    with caplog.at_level(logging.WARNING, logger="fleet.lan.discovery"):
        reg.apply_add(NAME, future, "10.0.0.5")
    assert rec.calls == [] and reg.heads() == []
    (line,) = [r.getMessage() for r in caplog.records]
    assert "wire version 2" in line and f"understands version {d.WIRE_VERSION}" in line and NAME in line
    assert "malformed" not in line


def test_listener_failure_does_not_stop_discovery(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def added(self, a: HeadAdvert) -> None:
            raise RuntimeError("boom")

    rec = Recorder()
    reg = HeadRegistry([Broken(), rec])
    with caplog.at_level(logging.ERROR, logger="fleet.lan.discovery"):
        reg.apply_add(NAME, txt_of(advert()), "10.0.0.5")
    assert rec.calls and "boom" in caplog.text


def test_find_by_name_and_the_only_cluster() -> None:
    reg = HeadRegistry()
    lab, home = advert(), advert(cluster_name="home", cluster_id="aaaaaaaaaaaaaaaa", host="10.0.0.7")
    reg.apply_add(NAME, txt_of(lab), lab.host)
    assert reg.find() == lab and reg.find("lab") == lab and reg.find("LAB") == lab
    reg.apply_add("home-aaaaaaaa._tilefleet._tcp.local.", txt_of(home), home.host)
    assert reg.find("home") == home
    with pytest.raises(AmbiguousHead, match="2 tilefleet clusters.*--cluster NAME"):
        reg.find()


def test_no_head_found_says_what_to_do() -> None:
    reg = HeadRegistry()
    with pytest.raises(NoHeadFound) as e:
        reg.find()
    msg = str(e.value)
    assert "tilefleet head" in msg and "multicast" in msg and "--address HOST:PORT" in msg
    assert "clusters seen: none" in msg
    reg.apply_add(NAME, txt_of(advert()), "10.0.0.5")
    with pytest.raises(NoHeadFound, match=r"for cluster 'other'.*clusters seen: lab \(id 01234567 at 10.0.0.5:6379\)"):
        reg.find("other")
    assert isinstance(e.value, LookupError)
    with pytest.raises(NoHeadFound):
        HeadRegistry().wait_for("lab", timeout=0.01)
    assert reg.wait_for("lab", timeout=0.01).cluster_name == "lab"


def test_same_name_two_ids_is_ambiguous_naming_both_hosts() -> None:
    reg = HeadRegistry()
    reg.apply_add(NAME, txt_of(advert()), "10.0.0.5")
    twin = advert(cluster_id="bbbbbbbbbbbbbbbb", host="10.0.0.8")
    reg.apply_add("lab-bbbbbbbb._tilefleet._tcp.local.", txt_of(twin), twin.host)
    with pytest.raises(AmbiguousHead) as e:
        reg.find("lab")
    assert "10.0.0.5" in str(e.value) and "10.0.0.8" in str(e.value) and "different ids" in str(e.value)


# --- static fallback -------------------------------------------------------------------------------


def test_static_heads_parses_lists() -> None:
    assert d.static_heads("10.0.0.5:6379, headhost:6380") == [("10.0.0.5", 6379), ("headhost", 6380)]
    assert d.static_heads(["a:1", "b:2,a:1", "[fe80::1]:6379"]) == [("a", 1), ("b", 2), ("fe80::1", 6379)]
    assert d.static_heads(["headhost"], default_port=6379) == [("headhost", 6379)]
    assert d.static_heads([]) == []


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("10.0.0.5:6379,,b:1", "empty entry 2"),
        ("", "empty entry 1"),
        ("10.0.0.5:0", "bad port '0'"),
        ("10.0.0.5:70000", "integer 1..65535"),
        ("10.0.0.5:http", "bad port 'http'"),
        ("headhost", "has no port; write HOST:PORT"),
        (":6379", "bad host ''"),
        ("bad host:1", "bad host 'bad host'"),
        ("fe80::1:6379", "[ADDRESS]:PORT"),
    ],
)
def test_static_heads_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        d.static_heads(spec)
    assert fragment in str(e.value)


# --- zeroconf adapters, with fakes (no network) ------------------------------------------------------


class FakeZeroconf:
    def __init__(self, info: zeroconf.ServiceInfo | None) -> None:
        self.info = info
        self.asked: list[tuple[str, str, int]] = []
        self.registered: list[zeroconf.ServiceInfo] = []
        self.unregistered: list[zeroconf.ServiceInfo] = []

    def get_service_info(self, type_: str, name: str, timeout: int = 3000) -> zeroconf.ServiceInfo | None:
        self.asked.append((type_, name, timeout))
        return self.info

    def register_service(self, info: zeroconf.ServiceInfo) -> None:
        self.registered.append(info)

    def unregister_service(self, info: zeroconf.ServiceInfo) -> None:
        self.unregistered.append(info)


def test_advertiser_builds_the_service_info_the_browser_reads(caplog: pytest.LogCaptureFixture) -> None:
    a = advert()
    fake = FakeZeroconf(None)
    adv = d.ZeroconfAdvertiser(a, fake)  # type: ignore[arg-type]
    adv.start()
    adv.start()  # idempotent
    (info,) = fake.registered
    assert info.name == f"lab-01234567.{d.SERVICE_TYPE}" and info.port == 6379
    assert info.addresses == [socket.inet_aton("10.0.0.5")]
    adv.close()
    assert fake.unregistered == [info]

    rec = Recorder()
    reg = HeadRegistry([rec])
    browser = d.ZeroconfBrowser(reg, fake, resolve_timeout_s=0.5)  # type: ignore[arg-type]
    fake.info = info
    browser._on_change(zeroconf=fake, service_type=d.SERVICE_TYPE, name=info.name,
                       state_change=zeroconf.ServiceStateChange.Added)
    assert rec.calls == [("added", a)] and fake.asked == [(d.SERVICE_TYPE, info.name, 500)]
    browser._on_change(zeroconf=fake, service_type=d.SERVICE_TYPE, name=info.name,
                       state_change=zeroconf.ServiceStateChange.Removed)
    assert rec.calls[-1] == ("removed", a.cluster_id)
    fake.info = None  # a service that never answers is logged and skipped
    with caplog.at_level(logging.WARNING, logger="fleet.lan.discovery"):
        browser._on_change(zeroconf=fake, service_type=d.SERVICE_TYPE, name=info.name,
                           state_change=zeroconf.ServiceStateChange.Updated)
    assert "did not answer" in caplog.text and len(rec.calls) == 2


def test_advertiser_refuses_a_host_name() -> None:
    adv = d.ZeroconfAdvertiser(advert(host="headbox"), FakeZeroconf(None))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="IP address"):
        adv.start()
