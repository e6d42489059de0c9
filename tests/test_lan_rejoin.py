"""The join's supervisor without Ray: when to rejoin (pure), how long to wait, finding the head
again with the token file read anew each try, and noticing a restarted head by its instance."""

from __future__ import annotations

import dataclasses
import logging
import subprocess
import time
from pathlib import Path

import pytest

from fleet.lan import member, procs, tokens
from fleet.lan.agent import Agent
from fleet.lan.member import JoinOptions, Outcome, backoff_delay, watch_verdict

from test_agent import DEVICES, TOKEN
from test_agent import advert as _advert


def advert(token: bytes, **kw: object) -> "member.HeadAdvert":
    return dataclasses.replace(_advert(token), **kw)  # type: ignore[arg-type]


def test_watch_verdict() -> None:
    assert watch_verdict(None, "aaaa1111", "aaaa1111") is None
    assert watch_verdict(None, "aaaa1111", None) is None  # away: maybe a blip; Ray gives up by itself if not
    assert watch_verdict(None, "aaaa1111", "bbbb2222") is Outcome.HEAD_RESTARTED
    assert watch_verdict(1, "aaaa1111", "aaaa1111") is Outcome.RAY_EXITED
    assert watch_verdict(0, "aaaa1111", "bbbb2222") is Outcome.RAY_EXITED
    assert watch_verdict(None, "", "bbbb2222") is None  # a head that does not say its instance


def test_backoff_grows_and_is_capped() -> None:
    delays = [backoff_delay(i) for i in range(12)]
    assert delays[0] == member.BACKOFF_FIRST_S and delays == sorted(delays)
    assert max(delays) == member.BACKOFF_MAX_S and sum(delays[:6]) < 25
    assert backoff_delay(-3) == member.BACKOFF_FIRST_S


def _agent(token: bytes, instance: str, port: int = 0) -> Agent:
    a = Agent(advert(token, instance=instance), token, lambda: DEVICES, host="127.0.0.1", port=port)
    a.start()
    return a


def test_wait_for_head_reads_the_token_file_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(member, "backoff_delay", lambda attempt: 0.05)
    a = _agent(TOKEN, "aaaa1111")
    old = tokens.create_token(tmp_path / "token")  # not the head's token: refused until it is copied
    stopper = procs.Stopper()
    last = advert(TOKEN, instance="0000ffff", agent_port=a.address[1])
    o = JoinOptions(node_ip="127.0.0.1", token=old, state=tmp_path, address=f"127.0.0.1:{a.address[1]}")
    try:
        with caplog.at_level(logging.WARNING, "tilefleet.lan"):
            import threading

            def copy_later() -> None:
                time.sleep(0.5)
                tokens.atomic_write(old.path, TOKEN)

            threading.Thread(target=copy_later).start()
            found = member._wait_for_head(o, last, stopper)
        assert found is not None
        got, client, o2 = found
        client.close()
        assert got.instance == "aaaa1111" and o2.token is not None and o2.token.value == TOKEN
        refusals = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
        assert refusals and "is not the one of cluster lab" in refusals[0], refusals
    finally:
        a.close()


def test_wait_for_head_gives_up_when_stopped(tmp_path: Path) -> None:
    stopper = procs.Stopper()
    stopper.event.set()
    o = JoinOptions(node_ip="127.0.0.1", token=None, state=tmp_path, address="127.0.0.1:9")
    assert member._wait_for_head(o, advert(TOKEN), stopper) is None


def test_watch_notices_a_restarted_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(member, "HEAD_CHECK_S", 0.2)
    monkeypatch.setattr(member, "WATCH_S", 0.05)
    a = _agent(TOKEN, "aaaa1111")
    port = a.address[1]
    child = subprocess.Popen(["sleep", "30"])
    stopper = procs.Stopper()
    try:
        t0 = time.monotonic()
        a.close()  # the head goes away ...
        b = _agent(TOKEN, "bbbb2222", port=port)  # ... and comes back as a new instance
        try:
            assert member._watch(child, "127.0.0.1", port, "aaaa1111", stopper, 2.0) is Outcome.HEAD_RESTARTED
        finally:
            b.close()
        assert time.monotonic() - t0 < 5
        c = _agent(TOKEN, "aaaa1111", port=port)  # the same instance: Ray exiting is the reason to rejoin
        try:
            child.kill()
            assert member._watch(child, "127.0.0.1", port, "aaaa1111", stopper, 2.0) is Outcome.RAY_EXITED
        finally:
            c.close()
    finally:
        child.kill()
        child.wait()


def test_join_options_are_plain_data() -> None:
    o = JoinOptions(node_ip="10.0.0.2", token=None, state=Path("/s"))
    assert dataclasses.replace(o, address="h:1").address == "h:1" and o.timeout == 5.0
