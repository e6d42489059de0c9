"""Every reader of the LAN layer's input from the network or disk has a size limit and validation:
state files, the cluster id, adverts' new fields and entry count (the agent's frames, the profile
cache, token files, PEM files and unit files have their own tests: test_agent, test_profiling,
test_lan, test_lan_tls, test_lan_service). And nothing in ``fleet/lan`` or ``fleet/cli`` unpickles
or evaluates input."""

from __future__ import annotations

import ast
import dataclasses
import json
import os
from pathlib import Path

import pytest

from fleet.lan import raynode, state
from fleet.lan.discovery import TXT_ENTRIES_MAX, BadAdvert, HeadAdvert

from test_agent import TOKEN
from test_agent import advert as _advert

ROOT = Path(__file__).resolve().parents[1]


def _live(tmp_path: Path, body: bytes) -> Path:
    p = tmp_path / "join.json"
    p.write_bytes(body)
    return p


@pytest.mark.parametrize("body", [
    b"", b"{", b"\xff\xfe", b"[1, 2]", b'{"pid": "12"}', b'{"pid": true}', b"[" * 100_000 + b"]" * 100_000,
    json.dumps({"pid": os.getpid(), "pad": "x" * state.STATE_MAX}).encode(),
], ids=["empty", "truncated", "binary", "list", "pid-text", "pid-bool", "deep", "oversized"])
def test_junk_state_files_are_stale_and_removed(tmp_path: Path, body: bytes) -> None:
    p = _live(tmp_path, body)
    assert state.read_state(p) is None and not p.exists()


def test_a_good_state_file_is_read(tmp_path: Path) -> None:
    from fleet.lan import procs

    p = tmp_path / "join.json"
    state.write_state(p, {**procs.own_identity(), "role": "device"})
    assert state.read_state(p)["role"] == "device"  # type: ignore[index]
    assert (p.stat().st_mode & 0o777) == 0o600


@pytest.mark.parametrize("body", [b"", b"zz" * 16, b"0" * 33, b"0" * 32 + b"\n" + b"x" * 10_000, b"\x00" * 32])
def test_junk_cluster_ids_are_replaced(tmp_path: Path, body: bytes) -> None:
    (tmp_path / "cluster_id").write_bytes(body)
    got = raynode.cluster_id(tmp_path)
    assert len(got) == 32 and all(c in "0123456789abcdef" for c in got)
    assert raynode.cluster_id(tmp_path) == got and (tmp_path / "cluster_id").read_text() == got


def test_advert_tls_and_instance_round_trip_and_validation() -> None:
    a = dataclasses.replace(_advert(TOKEN), tls=True, instance="0123abcd")
    txt = a.to_txt()
    assert txt["tls"] == "1" and txt["instance"] == "0123abcd"
    assert HeadAdvert.from_txt(txt, "127.0.0.1") == a
    older = {k: v for k, v in txt.items() if k not in ("tls", "instance")}  # a head that does not say
    b = HeadAdvert.from_txt(older, "127.0.0.1")
    assert b.tls is False and b.instance == ""
    for key, value, fragment in (("tls", "yes", "0 or 1"), ("instance", "XYZ", "8..32"),
                                 ("instance", "a" * 33, "8..32"), ("tls", "", "no value")):
        with pytest.raises(BadAdvert, match=fragment):
            HeadAdvert.from_txt({**txt, key: value}, "127.0.0.1")
    with pytest.raises(BadAdvert, match="must be a bool"):
        dataclasses.replace(a, tls="1")  # type: ignore[arg-type]


def test_a_txt_record_with_too_many_entries_is_refused() -> None:
    txt = {**_advert(TOKEN).to_txt(), **{f"k{i}": "v" for i in range(TXT_ENTRIES_MAX)}}
    with pytest.raises(BadAdvert, match=f"at most {TXT_ENTRIES_MAX}"):
        HeadAdvert.from_txt(txt, "127.0.0.1")


FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__"}
FORBIDDEN_MODULES = {"pickle", "cPickle", "marshal", "shelve", "dill", "cloudpickle"}


def test_no_pickle_or_eval_on_input() -> None:
    bad = []
    for path in sorted([*(ROOT / "fleet" / "lan").rglob("*.py"), *(ROOT / "fleet" / "cli").rglob("*.py")]):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                bad += [f"{path.name}:{node.lineno} imports {a.name}" for a in node.names
                        if a.name.split(".")[0] in FORBIDDEN_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in FORBIDDEN_MODULES:
                bad.append(f"{path.name}:{node.lineno} imports from {node.module}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_CALLS:
                bad.append(f"{path.name}:{node.lineno} calls {node.func.id}")
            elif isinstance(node, ast.Attribute) and node.attr in ("load", "unsafe_load") and \
                    isinstance(node.value, ast.Name) and node.value.id == "yaml":
                bad.append(f"{path.name}:{node.lineno} yaml.{node.attr}")
    assert not bad, bad
