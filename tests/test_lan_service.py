"""``tilefleet service`` and ``tilefleet token``: units as text (and as systemd reads them), install
and uninstall with a fake systemctl, the tests' own Restart= supervisor, token show and rotate
(with a stand-in head that restarts on SIGUSR1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fleet.cli import main as climain
from fleet.lan import service as svc
from fleet.lan import tokens
from fleet.lan.state import LanError

from unit_supervisor import restart_wanted

ROOT = Path(__file__).resolve().parents[1]


def spec(**kw: Any) -> svc.UnitSpec:
    base: dict[str, Any] = dict(role="join", argv=svc.command("join", cluster="lab", argv0=["/opt/tf/bin/tilefleet"]),
                                user="pi", working_dir=Path("/home/pi"),
                                environment={"HOME": "/home/pi", "PATH": "/opt/tf/bin:/usr/bin"}, cluster="lab")
    base.update(kw)
    return svc.UnitSpec(**base)


def test_unit_text_runs_the_exact_command_with_restart_on_failure() -> None:
    text = svc.unit_text(spec())
    sections = svc.parse_unit(text)
    s = sections["Service"]
    assert s["ExecStart"] == ["/opt/tf/bin/tilefleet join --cluster lab"]
    assert s["Restart"] == ["on-failure"] and s["User"] == ["pi"] and s["WorkingDirectory"] == ["/home/pi"]
    assert s["KillMode"] == ["mixed"] and s["Type"] == ["simple"]
    assert sections["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert sections["Install"]["WantedBy"] == ["multi-user.target"]
    argv, env, wd, policy, delay = svc.service_of(text)
    assert argv == ("/opt/tf/bin/tilefleet", "join", "--cluster", "lab") and "--detach" not in argv
    assert env == {"HOME": "/home/pi", "PATH": "/opt/tf/bin:/usr/bin"} and wd == Path("/home/pi")
    assert (policy, delay) == ("on-failure", svc.RESTART_SEC)
    user = svc.parse_unit(svc.unit_text(spec(system=False)))
    assert "User" not in user["Service"] and user["Install"]["WantedBy"] == ["default.target"]


def test_odd_words_are_quoted_and_read_back_exactly(tmp_path: Path) -> None:
    argv = ("/opt/my tf/bin/tilefleet", "join", "--token-file", '/home/pi/a "b" 100%$x\\y')
    s = spec(argv=argv, environment={"HOME": "/home/p i", "X": "50%$"}, working_dir=Path("/home/p%i"))
    got = svc.service_of(svc.unit_text(s))
    assert got[0] == argv and got[1] == {"HOME": "/home/p i", "X": "50%$"} and got[2] == Path("/home/p%i")
    with pytest.raises(LanError, match="newline"):
        svc.unit_text(spec(argv=("tilefleet", "join\n--evil")))
    with pytest.raises(LanError, match="absolute path"):
        svc.unit_text(spec(working_dir=Path("relative")))


def test_commands_per_role() -> None:
    head = svc.command("head", cluster="lab", tls=True, token_file="/t/tok", argv0=["tf"])
    assert head == ("tf", "head", "--name", "lab", "--tls", "--token-file", "/t/tok")
    join = svc.command("join", address="10.0.0.2:6390", device_name="pi1", num_cpus=2, argv0=["tf"])
    assert join == ("tf", "join", "--address", "10.0.0.2:6390", "--device-name", "pi1", "--num-cpus", "2")
    with pytest.raises(LanError, match="head's choice"):
        svc.command("join", tls=True)
    assert svc.unit_name("head", None) == "tilefleet-head.service"
    assert svc.unit_name("join", "lab") == "tilefleet-join-lab.service"
    for bad in (("leave", None), ("join", "a b"), ("join", "../x")):
        with pytest.raises(LanError):
            svc.unit_name(*bad)


@pytest.mark.parametrize("junk,fragment", [
    ("ExecStart=/bin/true\n", "inside a [section]"), ("[Service]\nnot a key value\n", "key=value"),
    ("[Service]\n" + "X=" + "y" * svc.UNIT_MAX, "under"), ("[Service]\nType=simple\n", "exactly one ExecStart"),
])
def test_junk_unit_files_are_refused(junk: str, fragment: str) -> None:
    with pytest.raises(LanError, match=re.escape(fragment)):
        svc.service_of(junk)


def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze here (systemd not installed): unit syntax checked by parse_unit only")
    exe = tmp_path / "tilefleet"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
    for role, s in (("join", spec(argv=svc.command("join", cluster="lab", argv0=[str(exe)]))),
                    ("head", spec(role="head", argv=svc.command("head", cluster="lab", tls=True, argv0=[str(exe)]))),
                    ("join", spec(argv=(str(exe), "join", "--token-file", "/a b/100%"), cluster=None))):
        s = svc.UnitSpec(**{**s.__dict__, "user": user, "working_dir": tmp_path})
        unit = tmp_path / svc.unit_name(role, s.cluster)
        unit.write_text(svc.unit_text(s))
        res = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
        problems = [line for line in (res.stdout + res.stderr).splitlines() if unit.name in line or "Failed" in line]
        assert res.returncode == 0 and not problems, res.stdout + res.stderr
    bad = tmp_path / "tilefleet-bad.service"
    bad.write_text(svc.unit_text(s).replace("Restart=on-failure", "Restart=sometimes"))
    res = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True, timeout=60)
    assert "restart specifier" in res.stderr  # the check above would see a bad unit


class FakeSystemctl:
    def __init__(self, fail: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, argv: Any) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        bad = self.fail is not None and self.fail in argv
        return subprocess.CompletedProcess(list(argv), 1 if bad else 0, "", "Access denied" if bad else "")


def test_install_and_uninstall(tmp_path: Path) -> None:
    fake = FakeSystemctl()
    lines = svc.install(spec(), tmp_path, run=fake)
    unit = tmp_path / "tilefleet-join-lab.service"
    assert unit.exists() and (unit.stat().st_mode & 0o777) == 0o644
    assert fake.calls == [["systemctl", "daemon-reload"], ["systemctl", "enable", unit.name]]
    assert any("starts at boot" in line for line in lines)
    svc.install(spec(system=False), tmp_path, run=fake, start=True)
    assert fake.calls[-1] == ["systemctl", "--user", "start", unit.name]
    no_systemd = svc.install(spec(), tmp_path, run=None)
    assert "systemctl enable tilefleet-join-lab.service" in no_systemd[-1]
    with pytest.raises(LanError, match="Access denied.*fix the problem"):
        svc.install(spec(), tmp_path, run=FakeSystemctl(fail="enable"))
    out = svc.uninstall("join", "lab", tmp_path, system=True, run=fake)
    assert not unit.exists() and fake.calls[-2] == ["systemctl", "disable", "--now", unit.name]
    assert "removed" in out[-1]
    assert "nothing to remove" in svc.uninstall("join", "lab", tmp_path, system=True, run=fake)[0]


def test_service_cli_writes_to_a_unit_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = climain.main(["service", "install", "join", "--cluster", "lab", "--unit-dir", str(tmp_path),
                       "--token-file", str(tmp_path / "tok")])
    out = capsys.readouterr().out
    assert rc == 0 and "wrote" in out and "systemd is not running here" in out
    argv = svc.service_of((tmp_path / "tilefleet-join-lab.service").read_text())[0]
    assert argv[1:] == ("join", "--cluster", "lab", "--token-file", str((tmp_path / "tok").resolve()))
    assert Path(argv[0]).name == "tilefleet" or argv[1:3] == ("-m", "fleet.cli.main")
    assert climain.main(["service", "uninstall", "join", "--cluster", "lab", "--unit-dir", str(tmp_path)]) == 0
    assert not list(tmp_path.glob("*.service"))
    assert climain.main(["service", "install", "head", "--cluster", "lab", "--tls", "--print"]) == 0
    assert "head --name lab --tls" in capsys.readouterr().out


@pytest.mark.parametrize("policy,code,wanted", [
    ("on-failure", 0, False), ("on-failure", 1, True), ("on-failure", 2, True), ("on-failure", -9, True),
    ("on-failure", -15, False), ("on-failure", -1, False), ("on-failure", -11, True), ("always", 0, True),
    ("no", 1, False),
])
def test_supervisor_follows_systemds_restart_rule(policy: str, code: int, wanted: bool) -> None:
    assert restart_wanted(policy, code) is wanted


def test_supervisor_restarts_a_killed_service(tmp_path: Path) -> None:
    marker = tmp_path / "starts"
    script = tmp_path / "svc.sh"
    script.write_text(f"#!/bin/sh\necho x >> {marker}\nexec sleep 300\n")
    script.chmod(0o755)
    unit = tmp_path / "t.service"
    unit.write_text(svc.unit_text(spec(argv=(str(script),), working_dir=tmp_path)).replace("RestartSec=5",
                                                                                            "RestartSec=0.2"))
    sup = subprocess.Popen([sys.executable, str(ROOT / "tests" / "unit_supervisor.py"), str(unit)],
                           stdout=subprocess.PIPE, text=True)
    try:
        first = sup.stdout.readline()  # type: ignore[union-attr]
        pid = int(first.split("pid ")[1])
        _wait_for(lambda: marker.exists() and marker.read_text().count("x") == 1)
        os.kill(pid, signal.SIGKILL)
        lines = [sup.stdout.readline() for _ in range(3)]  # type: ignore[union-attr]
        assert "exited with -9" in lines[0] and "restarting" in lines[1] and "start 2" in lines[2], lines
        _wait_for(lambda: marker.read_text().count("x") == 2)
        sup.send_signal(signal.SIGTERM)  # a clean stop: no restart
        assert sup.wait(timeout=10) == 0
        assert "exited with -15" in sup.stdout.read()  # type: ignore[union-attr]
    finally:
        if sup.poll() is None:
            sup.kill()


def _wait_for(pred: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- token show and rotate -------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var, sub in (("HOME", "home"), ("XDG_CONFIG_HOME", "home/cfg"), ("XDG_STATE_HOME", "home/st")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    return tmp_path / "home"


def test_token_show_and_rotate_without_a_head(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert climain.main(["token", "show"]) == 2
    assert "does not exist" in capsys.readouterr().err
    old = tokens.create_token(home / "cfg" / "tilefleet" / "token")
    assert climain.main(["token", "show"]) == 0
    out = capsys.readouterr().out
    assert old.fingerprint in out and "mode 600" in out and old.value.decode() not in out
    assert climain.main(["token", "rotate"]) == 0
    out = capsys.readouterr().out
    new = tokens.load_token(old.path)
    assert new.value != old.value and f"{old.fingerprint} -> {new.fingerprint}" in out
    assert (new.path.stat().st_mode & 0o777) == 0o600


FAKE_HEAD = r"""
import json, os, secrets, signal, sys, threading, time
sys.path.insert(0, sys.argv[2])
from fleet.lan import procs, state
from fleet.lan.tokens import load_token
path, token_path = sys.argv[1], sys.argv[3]
def write():
    st = {**procs.own_identity(), "token_path": token_path, "instance": secrets.token_hex(8),
          "cluster_name": "lab", "fingerprint": load_token(token_path).fingerprint}
    state.write_state(__import__("pathlib").Path(path), st)
restart = threading.Event()
signal.signal(signal.SIGUSR1, lambda *a: restart.set())
write()
print("up", flush=True)
while True:
    if restart.wait(0.1):
        restart.clear(); time.sleep(0.3); write()
"""


def test_token_rotate_restarts_a_running_head(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tok = tokens.create_token(home / "cfg" / "tilefleet" / "token")
    head_json = home / "st" / "tilefleet" / "head.json"
    head_json.parent.mkdir(parents=True)
    fake = subprocess.Popen([sys.executable, "-c", FAKE_HEAD, str(head_json), str(ROOT), str(tok.path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout.readline().strip() == "up"  # type: ignore[union-attr]
        before = json.loads(head_json.read_text())
        assert climain.main(["token", "rotate"]) == 2
        assert "--restart-head" in capsys.readouterr().err
        assert tokens.load_token(tok.path).value == tok.value  # refused: nothing changed
        assert climain.main(["token", "rotate", "--restart-head"]) == 0
        out = capsys.readouterr().out
        after = json.loads(head_json.read_text())
        assert after["instance"] != before["instance"] and after["pid"] == fake.pid
        assert after["fingerprint"] == tokens.load_token(tok.path).fingerprint != tok.fingerprint
        assert "restarted with it" in out
    finally:
        fake.kill()
        fake.wait()
