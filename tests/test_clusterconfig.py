"""``tilefleet cluster-config``: the ray up YAML is valid for Ray's own schema and avoids the sharp edges."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fleet.lan import clusterconfig as cc


@pytest.fixture
def opts(tmp_path: Path) -> cc.LaunchOptions:
    token = tmp_path / "token"
    token.write_text("s3cr3t-token-value")
    return cc.LaunchOptions(head="10.0.0.1", workers=("10.0.0.2", "10.0.0.3"), ssh_user="pi",
                            ssh_key=tmp_path / "key", token_file=token, name="lab")


def test_config_passes_rays_schema_and_avoids_sharp_edges(opts: cc.LaunchOptions) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    text = cc.dump(cc.build(opts))
    cfg = yaml.safe_load(text)
    validate_config(prepare_config(cfg))  # Ray's own schema, after its defaults are filled in
    assert cfg["provider"] == {"type": "local", "head_ip": "10.0.0.1", "worker_ips": ["10.0.0.2", "10.0.0.3"]}
    assert cfg["min_workers"] == cfg["max_workers"] == 2
    commands = [*cfg["head_start_ray_commands"], *cfg["worker_start_ray_commands"]]
    assert not any("ray stop" in c for c in commands)
    head, worker = cfg["head_start_ray_commands"][0], cfg["worker_start_ray_commands"][0]
    assert "RAY_enable_autoscaler_v2=0" in head and "--node-ip 10.0.0.1" in head
    assert "--autoscaling-config ~/ray_bootstrap_config.yaml" in head
    assert "join" in worker and "$RAY_HEAD_IP" in worker
    assert all(c.startswith("unset OMP_NUM_THREADS;") for c in commands)
    assert "s3cr3t" not in text  # the token travels as a file mount, never inside the YAML
    assert cfg["file_mounts"] == {cc.REMOTE_TOKEN: str(opts.token_file)}


def test_insecure_config_says_so(opts: cc.LaunchOptions) -> None:
    from dataclasses import replace

    cfg = cc.build(replace(opts, token_file=None))
    assert cfg["file_mounts"] == {}
    assert all("--insecure" in c and "--token-file" not in c
               for c in [*cfg["head_start_ray_commands"], *cfg["worker_start_ray_commands"]])


@pytest.mark.parametrize("kw,match", [
    ({"head": "10.0.0.2"}, "both the head and a worker"),
    ({"workers": ("10.0.0.2", "10.0.0.2")}, "listed twice"),
    ({"head": "bad host!"}, "not an IP address or host name"),
    ({"name": "no spaces"}, "cluster name"),
    ({"ssh_user": ""}, "not a user name"),
    ({"ray_port": 70000}, "not in 1..65535"),
])
def test_bad_options(opts: cc.LaunchOptions, kw: dict, match: str) -> None:
    from dataclasses import asdict

    with pytest.raises(cc.ClusterConfigError, match=match):
        cc.LaunchOptions(**{**asdict(opts), **kw})


def test_parse_hosts() -> None:
    assert cc.parse_hosts("10.0.0.2, 10.0.0.3 pi-kitchen") == ("10.0.0.2", "10.0.0.3", "pi-kitchen")
    with pytest.raises(cc.ClusterConfigError):
        cc.parse_hosts("10.0.0.2,;rm -rf")
