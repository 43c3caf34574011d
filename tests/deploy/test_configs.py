"""Deployment files: configs load and validate, every YAML key is commented, manifests parse,
the dashboard is fresh and names only declared metrics, placement rules hold."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import metrics as M
from common.config import ConfigError, load_config
from learner.cluster import check_placement, learner_bundles

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["deploy/configs/cluster.yaml", "deploy/configs/paper_triviaqa.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
def test_deploy_configs_load_and_validate(path):
    cfg = load_config(REPO / path)
    assert cfg.ray.address == "auto"
    check_placement(cfg)
    assert len(learner_bundles(cfg)) == cfg.learner.num_ranks


def test_paper_recipe():
    cfg = load_config(REPO / "deploy/configs/paper_triviaqa.yaml")
    a, lc, g = cfg.algorithm, cfg.learner, cfg.generators
    assert "Qwen2.5-7B" in cfg.model.path and cfg.data.kind == "files" and "triviaqa" in cfg.data.train_path
    assert a.advantage == "mt_grpo" and a.group_size == 21 and a.ppo_epochs == 2
    assert (a.clip_low, a.clip_high, a.kl_coef) == (0.2, 0.2, 0.0)
    assert (lc.lr, lc.warmup_steps, lc.betas, lc.grad_clip, lc.total_steps) == (1e-6, 20, [0.9, 0.99], 0.1, 300)
    assert cfg.generation.temperature == 0.9
    assert lc.zero_stage == 3 and lc.num_ranks == 7 and lc.num_gpus == 1
    assert g.num == 1 and g.num_gpus == 1 and not cfg.placement.colocate
    assert cfg.env.top_k == 1 and cfg.env.max_turns == 2
    assert cfg.placement.learner_strategy == "STRICT_PACK"
    assert (a.prompts_per_step * a.group_size) % lc.num_ranks == 0


@pytest.mark.parametrize("path", CONFIGS)
def test_every_yaml_key_is_commented(path):
    uncommented = [ln for ln in (REPO / path).read_text().splitlines()
                   if re.match(r"^\s*[A-Za-z_]+:", ln) and "#" not in ln]
    assert not uncommented, f"{path}: keys without a comment: {uncommented}"


def test_kuberay_manifests():
    job = yaml.safe_load((REPO / "deploy/kuberay/rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    entry = job["spec"]["entrypoint"].split()
    assert entry[:2] == ["turnrl", "train"]
    config = entry[entry.index("--config") + 1]
    assert config.startswith("/opt/turnrl/")
    load_config(REPO / config.removeprefix("/opt/turnrl/"), [x for x in entry if "=" in x and not x.startswith("-")])
    spec = job["spec"]["rayClusterSpec"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["turnrl-metrics"] == 9400
    assert "metrics.port=9400" in entry
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 8
    monitor = yaml.safe_load((REPO / "deploy/kuberay/podmonitor.yaml").read_text())
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} == {"metrics", "turnrl-metrics"}


def test_submit_script_help_and_bad_config():
    script = REPO / "deploy/submit.sh"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "ray job submit" in out.stdout
    bad = subprocess.run([str(script), "--config", "deploy/configs/nope.yaml"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "not found" in bad.stderr


def _make_dashboard():
    spec = importlib.util.spec_from_file_location("make_dashboard", REPO / "deploy/grafana/make_dashboard.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["make_dashboard"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_dashboard_is_generated_and_uses_declared_metrics():
    mod = _make_dashboard()
    path = REPO / "deploy/grafana/dashboards/turnrl.json"
    assert path.read_text() == mod.render(), "stale: run python deploy/grafana/make_dashboard.py"
    dash = json.loads(path.read_text())
    declared = {M.prometheus_name(n) for n in M.METRICS}
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    titles = {p["title"] for p in panels}
    for needed in ("Reward components", "Tool success", "Exact match", "Per-turn advantage",
                   "KL, clip fraction, entropy", "Tokens/s", "Queue depth", "Policy lag", "Weight-push time",
                   "Actor restarts"):
        assert needed in titles
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["description"] and p["targets"]
        for t in p["targets"]:
            for name in re.findall(r"\bturnrl_\w+", t["expr"]):
                name = re.sub(r"_seconds_(sum|count|bucket)$", "_seconds", name)  # a duration histogram's series
                assert name in declared, f"{p['title']}: {name} is not in common/metrics.py"
            assert t["datasource"]["uid"] == "${datasource}"
    readme = (REPO / "README.md").read_text()
    monitoring = readme.split("## Monitoring", 1)[1].split("\n## ", 1)[0]
    for title in titles:  # the README describes every panel
        assert f"**{title}**" in monitoring, f"README ## Monitoring does not describe panel {title!r}"


def test_grafana_provisioning_points_at_the_dashboard_datasource():
    ds = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/turnrl.yml").read_text())
    dash = json.loads((REPO / "deploy/grafana/dashboards/turnrl.json").read_text())
    default = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")["current"]["value"]
    assert ds["datasources"][0]["uid"] == default and ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((REPO / "deploy/grafana/provisioning/dashboards/turnrl.yml").read_text())
    assert prov["providers"][0]["type"] == "file"


def test_placement_rules():
    base = ["learner.num_ranks=2", "learner.num_gpus=1", "generators.num=2", "generators.num_gpus=1"]
    separate = load_config(None, base)
    check_placement(separate)
    assert learner_bundles(separate) == [{"CPU": 1.0, "GPU": 1.0}] * 2  # generators are not in the group
    with pytest.raises(ConfigError, match="add up to at most 1"):
        check_placement(load_config(None, base + ["placement.colocate=true"]))
    shared = load_config(None, ["learner.num_ranks=2", "learner.num_gpus=0.5", "generators.num=1",
                                "generators.num_gpus=0.5", "placement.colocate=true"])
    check_placement(shared)
    assert learner_bundles(shared) == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 0.5}]
    with pytest.raises(ConfigError, match="generators.num"):
        check_placement(load_config(None, ["learner.num_ranks=1", "generators.num=2", "placement.colocate=true"]))
    with pytest.raises(ConfigError, match="learner_strategy"):
        load_config(None, ["placement.learner_strategy=PACKED"])
