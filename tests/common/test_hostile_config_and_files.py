"""Hostile configuration, model directories and endpoints: each fails early, naming what is wrong.

(Hostile corpus / question / index files: tests/env_workers/test_prepare.py and test_corpus.py.)
"""

from __future__ import annotations

import shutil
import socket
import urllib.request
from pathlib import Path

import pytest

from common.config import ConfigError, MetricsConfig, load_config
from common.modeling import check_model_dir
from learner.cli import main

REPO = Path(__file__).resolve().parents[2]
LOCAL = REPO / "deploy/configs/local.yaml"


@pytest.mark.parametrize("override,field,rule", [
    ("learner.lr=.nan", "learner.lr", "finite"),
    ("generation.temperature=.inf", "generation.temperature", "finite"),
    ("metrics.log_every=0", "metrics.log_every", ">= 1"),
    ("eval.num_questions=0", "eval.num_questions", ">= 1"),
    ("learner.bucket_mb=0", "learner.bucket_mb", ">= 1"),
    ("generators.max_restarts=-5", "generators.max_restarts", ">= -1"),
    ("env.num_cpus=-1", "env.num_cpus", ">= 0"),
    ("learner.torch_threads=0", "learner.torch_threads", ">= 1"),
    ("run.log_level=LOUD", "run.log_level", "DEBUG"),
    ("data.num_people=0", "data.num_people", ">= 1"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps", ">= 0"),
    ("checkpoint.keep=0", "checkpoint.keep", ">= 1"),
    ("faults.kill=[{actor: generatr}]", "faults.kill[0].actor", "did you mean 'generator'"),
    ("faults.kill=[{actor: env_worker, index: 1}]", "faults.kill[0].index", "< 1"),
    ("faults.kill=[{actor: learner, after_step: -1}]", "faults.kill[0].after_step", ">= 0"),
])
def test_bad_values_name_field_value_and_rule(override, field, rule):
    with pytest.raises(ConfigError) as e:
        load_config(LOCAL, [override])
    assert f"`{field}`" in str(e.value) and rule in str(e.value), str(e.value)


def test_unknown_keys_get_a_did_you_mean_at_every_level():
    with pytest.raises(ConfigError, match=r"`checkpoint.every`: unknown key; did you mean `every_steps`"):
        load_config(LOCAL, ["checkpoint.every=3"])
    with pytest.raises(ConfigError, match=r"`faults.kill\[0\].afterstep`: unknown key; did you mean `after_step`"):
        load_config(LOCAL, ["faults.kill=[{actor: rollout, afterstep: 1}]"])
    with pytest.raises(ConfigError, match=r"`learnr`: unknown key; did you mean `learner`"):
        load_config(LOCAL, ["learnr.lr=0.1"])


@pytest.mark.parametrize("name,content,expected", [
    ("syntax", b"learner:\n  lr: [1,\n", "invalid YAML at line 3"),
    ("tab", b"learner:\n\tlr: 1\n", "invalid YAML at line 2"),
    ("binary", b"\xff\xfe\x00garbage", "not UTF-8"),
    ("list", b"- 1\n- 2\n", "must hold a YAML mapping"),
])
def test_broken_config_files_name_the_file(tmp_path, name, content, expected):
    p = tmp_path / f"{name}.yaml"
    p.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and expected in str(e.value)
    with pytest.raises(ConfigError, match=r"config override 'learner.lr=\[1': invalid YAML"):
        load_config(LOCAL, ["learner.lr=[1"])


def test_config_is_rejected_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a config that is invalid")

    monkeypatch.setattr(ray, "init", no_ray)
    assert main(["train", "--config", str(LOCAL), "learner.lr=-1"]) == 2
    assert "`learner.lr` = -1" in capsys.readouterr().err
    # a bad model directory is caught by the driver before Ray starts (and before any data is prepared)
    assert main(["train", "--config", str(LOCAL), f"model.path={tmp_path / 'missing'}",
                 f"data.dir={tmp_path / 'data'}", f"run.run_dir={tmp_path / 'run'}"]) == 2
    assert f"model.path '{tmp_path / 'missing'}' is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_train_needs_a_config_or_a_resume_dir(capsys):
    with pytest.raises(SystemExit):
        main(["train"])
    assert "--config" in capsys.readouterr().err


def _copy_model(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(REPO / "deploy/warmstart", dst)
    return dst


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_MODELS = {  # case -> (file, how to break it, text expected in the error)
    "truncated weights": ("model.safetensors", lambda p: _truncate(p), "is truncated"),
    "empty weights": ("model.safetensors", lambda p: p.write_bytes(b""), "empty or truncated"),
    "garbage weights": ("model.safetensors", lambda p: p.write_bytes(b"\xff" * 64), "does not fit the file"),
    "no weights": ("model.safetensors", lambda p: p.unlink(), "has no weights"),
    "truncated config": ("config.json", lambda p: _truncate(p), "not valid JSON"),
    "config without model_type": ("config.json", lambda p: p.write_text('{"hidden_size": 8}'), "no model_type"),
    "truncated tokenizer": ("tokenizer.json", lambda p: _truncate(p), "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_bad_model_directories_fail_naming_the_file(tmp_path, case):
    name, breaks, expected = BAD_MODELS[case]
    m = _copy_model(tmp_path)
    breaks(m / name)
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        check_model_dir(m)
    assert str(m) in str(e.value) and expected in str(e.value), str(e.value)
    if case != "no weights":
        assert name in str(e.value)


def test_the_shipped_model_directory_passes():
    assert check_model_dir(REPO / "deploy/warmstart") == REPO / "deploy/warmstart"


def test_metrics_endpoint_binds_loopback_by_default(tmp_path):
    from common.telemetry import MetricsSink

    assert MetricsConfig().host == "127.0.0.1" and load_config(LOCAL).metrics.host == "127.0.0.1"
    sink = MetricsSink(tmp_path)  # the defaults the driver passes
    try:
        assert sink._server.server_address[0] == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{sink.port}/metrics", timeout=5).read().decode()
        assert "turnrl_audit_episodes_trained_total" in body
        for ip in _non_loopback_addresses():  # nothing answers on the machine's other interfaces
            with socket.socket() as s, pytest.raises(OSError):
                s.settimeout(2)
                s.connect((ip, sink.port))
    finally:
        sink.close()


def _non_loopback_addresses() -> list[str]:
    ips = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            ips.add(info[4][0])
    except OSError:
        pass
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # the default route's address (no packet sent)
        try:
            s.connect(("10.255.255.255", 1))
            ips.add(s.getsockname()[0])
        except OSError:
            pass
    return sorted(ip for ip in ips if not ip.startswith("127."))
