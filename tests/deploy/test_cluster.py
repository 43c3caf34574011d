"""The cluster launch path and the monitoring stack, for real, on loopback.

One short training run serves both tests (CPU is scarce):

1. a Ray head (`ray start --head --block`, dashboard on, so the Jobs API and Ray's Prometheus
   service-discovery file exist) in a short temp dir;
2. a real Prometheus (Debian package; installed here when missing) configured from
   ``deploy/prometheus/prometheus.yml`` with only the file paths and a 1 s scrape interval changed;
3. ``deploy/submit.sh`` -> ``ray job submit --working-dir . -- turnrl train --config
   deploy/configs/cluster.yaml`` with CPU overrides: 2 learner ranks in a placement group
   (ZeRO-2 over gloo), a generator, an env worker, 2 steps;
4. the head is stopped with SIGTERM to the process we started (``ray stop`` would kill every
   Ray on the machine, including other people's).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import BIN, REPO, base_env, ensure_prometheus, free_port, http_ok, stop_process, wait_for

STEPS = 2
DASHBOARD = REPO / "deploy/grafana/dashboards/turnrl.json"


_STATUS = """
import sys
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
print("STATUS", client.get_job_status(sys.argv[2]).value if len(sys.argv) > 2 else len(client.list_jobs()))
"""


def _job_status(env: dict, address: str, submission_id: str | None = None) -> str | None:
    """The job's status through Ray's Python SDK (in a subprocess: it reads the auth token from ``env``)."""
    args = [sys.executable, "-c", _STATUS, address] + ([submission_id] if submission_id else [])
    out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    m = re.search(r"^STATUS (\w+)$", out.stdout, re.M)
    return m.group(1) if out.returncode == 0 and m else None


def _terminal_status(env: dict, address: str, submission_id: str) -> str | None:
    status = _job_status(env, address, submission_id)
    return status if status in ("SUCCEEDED", "FAILED", "STOPPED") else None


def _prometheus_config(targets_dir: Path, ray_sd: Path) -> dict:
    """deploy/prometheus/prometheus.yml with the test's file_sd paths and a 1 s scrape interval."""
    cfg = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    jobs = {job["job_name"]: job for job in cfg["scrape_configs"]}
    assert set(jobs) == {"turnrl", "ray"}, "prometheus.yml must scrape turnrl runs and Ray"
    jobs["turnrl"]["file_sd_configs"][0].update(files=[str(targets_dir / "*.json")], refresh_interval="1s")
    jobs["ray"]["file_sd_configs"][0].update(files=[str(ray_sd)], refresh_interval="1s")
    return cfg


@pytest.fixture(scope="module")
def cluster_run(tiny_policy):
    tmp = Path(tempfile.mkdtemp(prefix="trl", dir="/tmp"))  # short: Ray's socket paths live under it
    env = base_env()
    targets_dir, run_dir = tmp / "targets", tmp / "runs" / "job"
    targets_dir.mkdir()
    procs: list[subprocess.Popen] = []
    result: dict = {"tmp": tmp, "run_dir": run_dir, "targets_dir": targets_dir}
    try:
        # -- Prometheus first, so it scrapes the run from its start -----------------------------
        prom_bin, result["prometheus_skip"] = ensure_prometheus()
        if prom_bin:
            (tmp / "prometheus.yml").write_text(yaml.safe_dump(
                _prometheus_config(targets_dir, tmp / "prom_metrics_service_discovery.json")))
            pport = free_port()
            plog = tmp / "prometheus.log"
            prom = subprocess.Popen(
                [prom_bin, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{pport}"],
                stdout=plog.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
            procs.append(prom)
            wait_for(lambda: http_ok(f"http://127.0.0.1:{pport}/-/ready"), "Prometheus", 120, prom, plog)
            result["prometheus"] = f"http://127.0.0.1:{pport}"

        # -- a Ray head on loopback ----------------------------------------------------------------
        dash = free_port()
        hlog = tmp / "ray_head.log"
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=4", "--num-gpus=0",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--metrics-export-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
             f"--ray-client-server-port={free_port()}", f"--temp-dir={tmp}", "--disable-usage-stats"],
            stdout=hlog.open("w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)
        procs.insert(0, head)
        address = f"http://127.0.0.1:{dash}"
        wait_for(lambda: _job_status(env, address), "Ray head (Jobs API)", 600, head, hlog, interval_s=2)

        # -- ray job submit, through deploy/submit.sh ---------------------------------------------
        sid = f"turnrl-test-{uuid.uuid4().hex[:8]}"
        overrides = [
            f"model.path={tiny_policy}", "model.dtype=float32", f"data.dir={tmp / 'data'}", "data.num_people=400",
            "generators.num_gpus=0", "generators.num_cpus=1", "generators.torch_threads=1",
            "learner.num_gpus=0", "learner.num_cpus=1", "learner.num_ranks=2", "learner.torch_threads=1",
            "env.num_workers=1", "env.num_cpus=0.5", f"learner.total_steps={STEPS}", "algorithm.prompts_per_step=4",
            "algorithm.group_size=4", "learner.micro_batch_size=8", "eval.num_questions=8", "eval.greedy=false",
            "eval.before_training=false",
            "generation.max_tokens_per_turn=16", "metrics.host=127.0.0.1", f"metrics.discovery_dir={targets_dir}",
            f"metrics.linger_s={6 if prom_bin else 0}",
            # a judge actor beside the env worker (the tiny random policy as its model), so the dashboard's judge row has data
            "judge.enabled=true", f"judge.model_path={tiny_policy}", "judge.turn_weight=0.2", "judge.outcome_weight=0.2",
            "judge.num_cpus=0.5",
        ]
        result["t_submit"] = time.time()
        sub = subprocess.run(
            [str(REPO / "deploy/submit.sh"), "--address", address, "--config", "deploy/configs/cluster.yaml",
             "--run-dir", str(run_dir), "--submission-id", sid, "--no-wait", "--", *overrides],
            cwd=REPO, env={**env, "RAY_CLI": str(BIN / "ray"), "PYTHON": sys.executable},
            capture_output=True, text=True, timeout=600)
        assert sub.returncode == 0, f"submit.sh failed:\n{sub.stdout}\n{sub.stderr}"
        result["status"] = wait_for(lambda: _terminal_status(env, address, sid), f"Ray job {sid}", 1500, head, hlog,
                                    interval_s=5)
        result["t_end"] = time.time()
        result["logs"] = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", address, sid], env=env,
                                        capture_output=True, text=True, timeout=120).stdout
        result["submit_output"] = sub.stdout + sub.stderr
        yield result
    finally:
        for p in procs:
            stop_process(p)
        shutil.rmtree(tmp, ignore_errors=True)


def test_ray_job_submit_trains_on_a_real_cluster(cluster_run):
    logs = cluster_run["logs"]
    assert cluster_run["status"] == "SUCCEEDED", logs[-5000:]
    assert "ray job submit" in cluster_run["submit_output"] and "--working-dir ." in cluster_run["submit_output"]
    # the job's logs show the training steps and the placement of 2 learner ranks
    assert re.search(rf"train: +100%.*\| {STEPS}/{STEPS} ", logs), logs[-3000:]
    assert "learner placement group ready: 2 bundle(s)" in logs
    run_dir = cluster_run["run_dir"]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["learner_version"] == STEPS and summary["generator_versions"] == [STEPS]
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["train/step"] for x in lines] == [1, 2]
    assert (run_dir / "policy" / "model.safetensors").is_file()
    # Prometheus discovery: the run's target file is kept, the live copy removed at the end
    target = json.loads((run_dir / "prometheus_targets.json").read_text())
    assert target[0]["labels"]["run"] == "job" and target[0]["targets"][0].startswith("127.0.0.1:")
    assert not list(cluster_run["targets_dir"].glob("*.json"))


TENSOR_ROW = "Tensor agents"  # its panels have data in tensor-agent runs (tests/learner/test_tensor_training.py)


def _dashboard_queries() -> tuple[list[tuple[str, str]], list[str]]:
    """(panel title, PromQL) for every target of every panel of an LLM run's rows, and the template variables'
    queries."""
    dash = json.loads(DASHBOARD.read_text())
    exprs, row = [], ""
    for p in dash["panels"]:
        if p.get("type") == "row":
            row = p["title"]
        elif not row.startswith(TENSOR_ROW):
            exprs += [(p["title"], t["expr"]) for t in p["targets"]]
    variables = [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs, variables


def _get(url: str, params: dict) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(params, doseq=True)}", timeout=30) as r:
        body = json.loads(r.read().decode())
    assert body["status"] == "success", body
    return body["data"]


def test_prometheus_scrapes_the_run_and_every_dashboard_query_has_data(cluster_run):
    if not cluster_run.get("prometheus"):
        pytest.skip(f"no Prometheus: {cluster_run['prometheus_skip']}")
    base = cluster_run["prometheus"]
    run = cluster_run["run_dir"].name
    window = {"start": cluster_run["t_submit"] - 30, "end": time.time(), "step": 1}
    exprs, variables = _dashboard_queries()
    assert len(exprs) >= 20
    missing = []
    for title, expr in exprs:  # Grafana's variables as Grafana would fill them for this run
        q = expr.replace("$run", re.escape(run)).replace("$__rate_interval", "1m")
        if not _get(f"{base}/api/v1/query_range", {"query": q, **window})["result"]:
            missing.append(f"{title}: {q}")
    assert not missing, "dashboard queries without data:\n" + "\n".join(missing)
    # the run selector: label_values(turnrl_train_step, run) lists this run
    for definition in variables:
        m = re.fullmatch(r"label_values\((\w+), *(\w+)\)", definition)
        assert m, definition
        assert run in _get(f"{base}/api/v1/label/{m.group(2)}/values", {"match[]": m.group(1), **window})
    # the final values were scraped (metrics.linger_s), and Ray's own targets were up
    steps = _get(f"{base}/api/v1/query_range", {"query": f'turnrl_train_step{{run="{run}"}}', **window})["result"]
    assert max(float(v) for _, v in steps[0]["values"]) == STEPS
    up = _get(f"{base}/api/v1/query_range", {"query": 'up{job="ray"}', **window})["result"]
    assert any(float(v) == 1 for s in up for _, v in s["values"])
