"""TLS for Ray's traffic, without Ray: the CA, device requests and what the head refuses to sign,
certificates checked before use, the agent's ``certify`` op behind the token challenge and its
seal, owner-only files, and Ray's environment."""

from __future__ import annotations

import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleet.lan import raynode, tls
from fleet.lan import tokens as tk
from fleet.lan.agent import CSR_MAX, Agent, AgentClient, AgentRefused, HeadNotProven, read_frame

from test_agent import DEVICES, OTHER, TOKEN, advert

IP = "10.0.0.7"


@pytest.fixture(scope="module")
def ca() -> tuple[bytes, bytes]:
    return tls.make_ca("lab")


def test_signed_certificate_checks_out_and_names_the_address(ca: tuple[bytes, bytes]) -> None:
    key = tls.new_key_pem()
    cert = tls.sign_csr(*ca, tls.make_csr(key, IP), IP)
    tls.check_issued(cert, ca[0], key, IP)
    assert 390 < tls.days_left(cert) < 400
    with pytest.raises(tls.TlsError, match="not for this device's key"):
        tls.check_issued(cert, ca[0], tls.new_key_pem(), IP)
    with pytest.raises(tls.TlsError, match="does not name this node's address 10.0.0.8"):
        tls.check_issued(cert, ca[0], key, "10.0.0.8")
    other_ca = tls.make_ca("other")
    with pytest.raises(tls.TlsError, match="not issued by the cluster's CA"):
        tls.check_issued(cert, other_ca[0], key, IP)


def test_the_head_signs_only_for_the_requesters_address(ca: tuple[bytes, bytes]) -> None:
    key = tls.new_key_pem()
    with pytest.raises(tls.TlsError, match="does not name the requester's address 10.0.0.9"):
        tls.sign_csr(*ca, tls.make_csr(key, IP), "10.0.0.9")
    # a request naming another host too (to impersonate it) is refused
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    k = serialization.load_pem_private_key(key, None)
    names = x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address(IP)),
                                         x509.DNSName("head.example")])
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                                              "x")]))
           .add_extension(names, critical=False).sign(k, hashes.SHA256())).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(tls.TlsError, match=r"asks for \['head.example'\]"):
        tls.sign_csr(*ca, csr, IP)


@pytest.mark.parametrize(("csr", "fragment"), [
    (b"", "1..16384 bytes"), (b"x" * (tls.PEM_MAX + 1), "1..16384 bytes"), (b"junk", "not a PEM CSR"),
    (b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM CSR"),
    ("text", "must be bytes"),
])
def test_junk_requests_are_refused(ca: tuple[bytes, bytes], csr: bytes, fragment: str) -> None:
    with pytest.raises(tls.TlsError, match=fragment):
        tls.sign_csr(*ca, csr, IP)  # type: ignore[arg-type]


def test_a_tampered_request_is_refused(ca: tuple[bytes, bytes]) -> None:
    csr = tls.make_csr(tls.new_key_pem(), IP)
    lines = csr.splitlines()
    body = bytearray(b"".join(lines[1:-1]))
    body[-10] = ord("A") if body[-10] != ord("A") else ord("B")  # inside the signature
    bad = b"\n".join([lines[0], bytes(body), lines[-1]]) + b"\n"
    with pytest.raises(tls.TlsError):
        tls.sign_csr(*ca, bad, IP)


def test_small_rsa_keys_are_refused(ca: tuple[bytes, bytes]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with pytest.raises(tls.TlsError, match="RSA key has 1024 bits"):
        tls.sign_csr(*ca, tls.make_csr(weak, IP), IP)


def test_head_files_are_owner_only_and_kept(tmp_path: Path) -> None:
    files = tls.head_files(tmp_path, "lab", IP)
    d = tmp_path / "tls"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    for p in (files.ca_cert, files.cert, files.key, d / "ca.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    tls.check_issued(files.cert.read_bytes(), files.ca_cert.read_bytes(), files.key.read_bytes(), IP)
    ca_before, cert_before = files.ca_cert.read_bytes(), files.cert.read_bytes()
    again = tls.head_files(tmp_path, "lab", IP)
    assert again.ca_cert.read_bytes() == ca_before and again.cert.read_bytes() == cert_before
    moved = tls.head_files(tmp_path, "lab", "10.0.0.99")  # a new address: a new head certificate, same CA
    assert moved.ca_cert.read_bytes() == ca_before and moved.cert.read_bytes() != cert_before
    tls.check_issued(moved.cert.read_bytes(), ca_before, moved.key.read_bytes(), "10.0.0.99")


def test_pem_files_are_read_with_limits(tmp_path: Path) -> None:
    big = tmp_path / "big.crt"
    big.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + b"A" * tls.PEM_MAX)
    with pytest.raises(tls.TlsError, match="not a PEM file of at most"):
        tls.read_pem(big, "certificate")
    junk = tmp_path / "junk.crt"
    junk.write_bytes(b"\x00\x01 not pem")
    with pytest.raises(tls.TlsError, match="not a PEM file"):
        tls.read_pem(junk, "certificate")
    key = tmp_path / "node.key"
    key.write_bytes(tls.new_key_pem())
    key.chmod(0o644)
    with pytest.raises(tls.TlsError, match="readable by others"):
        tls.read_pem(key, "key")
    with pytest.raises(tls.TlsError, match="does not exist"):
        tls.read_pem(tmp_path / "none.crt", "certificate")
    with pytest.raises(tls.TlsError, match="not a PEM private key"):
        tls._load_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")


def test_ray_env_turns_tls_on_or_off(tmp_path: Path) -> None:
    files = tls.TlsFiles(tmp_path / "ca.crt", tmp_path / "n.crt", tmp_path / "n.key")
    env = raynode.ray_env({"RAY_TLS_CA_CERT": "/stray"}, tmp_path / "token", files)
    assert env["RAY_USE_TLS"] == "1" and env["RAY_TLS_CA_CERT"] == str(files.ca_cert)
    assert env["RAY_TLS_SERVER_CERT"] == str(files.cert) and env["RAY_TLS_SERVER_KEY"] == str(files.key)
    off = raynode.ray_env({"RAY_USE_TLS": "1", "RAY_TLS_CA_CERT": "/stray"}, None)
    assert off["RAY_USE_TLS"] == "0" and "RAY_TLS_CA_CERT" not in off


# --- the agent's certify op ------------------------------------------------------------------------


@pytest.fixture
def tls_agent(tmp_path: Path) -> Iterator[Agent]:
    tls.head_files(tmp_path, "lab", "127.0.0.1")
    a = Agent(advert(), TOKEN, lambda: DEVICES, host="127.0.0.1", port=0, signer=tls.Signer(tmp_path))
    a.start()
    yield a
    a.close()


def test_certify_after_the_challenge_gives_a_checked_certificate(tls_agent: Agent, tmp_path: Path) -> None:
    with AgentClient(*tls_agent.address) as c:
        c.prove_head(TOKEN)
        files = tls.obtain(c, TOKEN, tmp_path / "dev", "node", "127.0.0.1")
    assert stat.S_IMODE((tmp_path / "dev").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (files.cert, files.key, files.ca_cert))
    assert files.ca_cert.read_bytes() == (tmp_path / "tls" / "ca.crt").read_bytes()
    assert b"PRIVATE" not in files.ca_cert.read_bytes() + files.cert.read_bytes()


def test_certify_needs_the_proof_and_a_request_for_the_peer(tls_agent: Agent) -> None:
    csr = tls.make_csr(tls.new_key_pem(), "127.0.0.1")
    with AgentClient(*tls_agent.address) as c, pytest.raises(AgentRefused, match="needs the device's proof"):
        c.call("certify", csr=csr)
    with AgentClient(*tls_agent.address) as c:
        c.prove_head(TOKEN)
        with pytest.raises(AgentRefused, match=r"certificate refused: .*asks for \['10.9.9.9'\]"):
            c.certify(tls.make_csr(tls.new_key_pem(), "10.9.9.9"), TOKEN)
        with pytest.raises(AgentRefused, match="csr must be"):
            c.call("certify", csr=b"x" * (CSR_MAX + 1))
        with pytest.raises(AgentRefused, match="not a PEM CSR"):
            c.call("certify", csr=b"junk")
        assert c.certify(csr, TOKEN)[0].startswith(b"-----BEGIN CERTIFICATE")  # the connection serves on


def test_a_certificate_not_sealed_with_the_token_is_not_used(tls_agent: Agent) -> None:
    csr = tls.make_csr(tls.new_key_pem(), "127.0.0.1")
    with AgentClient(*tls_agent.address) as c:
        c.prove_head(TOKEN)
        reply = c.call("certify", csr=csr)
    assert tk.verify_certificate_mac(TOKEN, csr, reply["cert"], reply["ca"], reply["mac"])
    assert not tk.verify_certificate_mac(OTHER, csr, reply["cert"], reply["ca"], reply["mac"])
    assert not tk.verify_certificate_mac(TOKEN, csr, reply["cert"], tls.make_ca("evil")[0], reply["mac"])
    # a man in the middle swapping the CA: the client refuses the reply
    with AgentClient(*tls_agent.address) as c:
        c.prove_head(TOKEN)
        real_call = c.call
        c.call = lambda op, **kw: {**real_call(op, **kw), "ca": tls.make_ca("evil")[0]}  # type: ignore[method-assign]
        with pytest.raises(HeadNotProven, match="not sealed with the cluster's token"):
            c.certify(csr, TOKEN)


def test_a_head_without_tls_says_so() -> None:
    a = Agent(advert(), TOKEN, lambda: DEVICES, host="127.0.0.1", port=0)
    a.start()
    try:
        with AgentClient(*a.address) as c:
            c.prove_head(TOKEN)
            with pytest.raises(AgentRefused, match="does not use TLS"):
                c.certify(tls.make_csr(tls.new_key_pem(), "127.0.0.1"), TOKEN)
    finally:
        a.close()


def test_certify_frame_over_the_limit_is_refused_before_reading(tls_agent: Agent) -> None:
    with socket.create_connection(tls_agent.address, timeout=5) as s:
        s.sendall((10 * 2**20).to_bytes(4, "big"))
        reply = read_frame(s, 2**20)
        assert reply["ok"] is False and "larger than" in reply["error"]
    with AgentClient(*tls_agent.address) as c:
        assert c.info().cluster_name == "lab"
