"""common/telemetry.py (with common/metrics.py's names and types): what a scraper and the trackers see, through real HTTP and the real libraries.

The Prometheus endpoint is scraped over loopback and parsed with prometheus_client's own parser;
TensorBoard event files are read back with TensorBoard's reader; the W&B offline run file is read
record by record (LevelDB log framing, wandb's protobuf records).
"""

from __future__ import annotations

import json
import struct
import urllib.request
from pathlib import Path

import pytest

from common import metrics as M
from common import telemetry as T

STEPS = [
    {M.AUDIT_TRAINED: 16, M.LOSS: 0.5, M.TIME_STEP: 0.3, M.TIME_UPDATE: 0.2},
    {M.AUDIT_TRAINED: 32, M.LOSS: 0.25, M.TIME_STEP: 7.0, M.TIME_UPDATE: 0.1},
]


def _scrape(port: int) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: f for f in text_string_to_metric_families(body)}


def test_prometheus_types_counters_gauges_and_duration_histograms(tmp_path):
    sink = T.MetricsSink(tmp_path, host="127.0.0.1", port=0)
    try:
        for step, values in enumerate(STEPS, 1):
            sink.log(step, values)
        fam = _scrape(sink.port)
    finally:
        sink.close()
    trained = fam["turnrl_audit_episodes_trained"]  # the parser drops a counter's _total from the family name
    assert trained.type == "counter"
    assert [(s.name, s.value) for s in trained.samples] == [("turnrl_audit_episodes_trained_total", 32.0)]
    loss = fam["turnrl_train_loss"]
    assert loss.type == "gauge" and loss.samples[0].value == 0.25  # the latest step's value
    step = fam["turnrl_perf_time_step_seconds"]  # bucketing of the logged values 0.3 and 7.0: nothing is timed
    assert step.type == "histogram"
    by = {(s.name, s.labels.get("le")): s.value for s in step.samples}
    assert by[("turnrl_perf_time_step_seconds_count", None)] == 2.0
    assert by[("turnrl_perf_time_step_seconds_sum", None)] == pytest.approx(7.3)
    assert by[("turnrl_perf_time_step_seconds_bucket", "0.5")] == 1.0  # 0.3 s in it, 7 s not
    assert by[("turnrl_perf_time_step_seconds_bucket", "10.0")] == 2.0
    assert by[("turnrl_perf_time_step_seconds_bucket", "+Inf")] == 2.0
    assert M.prometheus_name(M.TIME_STEP) == "turnrl_perf_time_step_seconds"
    assert {M.prometheus_kind(n) for n in M.METRICS} == {"counter", "gauge", "histogram"}
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)[M.TIME_STEP] for x in lines] == [0.3, 7.0]  # the log keeps every step's value


def test_report_to_tensorboard_writes_every_step_through_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = T.MetricsSink(tmp_path, enabled=False, report_to=["tensorboard"], config={"learner": {"lr": 1e-4}})
    for step, values in enumerate(STEPS, 1):
        sink.log(step, values)
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(STEPS[0])
    assert [(e.step, e.value) for e in acc.Scalars(M.LOSS)] == [(1, 0.5), (2, 0.25)]
    assert "config" in acc.Tags()["tensors"] or "config/text_summary" in acc.Tags()["tensors"]


def _wandb_records(path: Path) -> list:
    """Records of a W&B ``.wandb`` file: a 7-byte header, then LevelDB-log chunks in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_report_to_wandb_offline_writes_a_run_wandb_sync_can_upload(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    sink = T.MetricsSink(tmp_path, enabled=False, report_to=["wandb"], run_name="t-run",
                         config={"learner": {"lr": 1e-4}}, wandb_project="turnrl-test")
    for step, values in enumerate(STEPS, 1):
        sink.log(step, values)
    sink.close()
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = []
    for rec in _wandb_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    assert [(h["_step"], h[M.LOSS], h[M.AUDIT_TRAINED]) for h in history] == [(1, 0.5, 16), (2, 0.25, 32)]


def test_a_tracker_that_is_not_installed_fails_before_anything_starts(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match=r"report_to has 'wandb'.*pip install"):
        T.check_report_to(["tensorboard", "wandb"])
    T.check_report_to(["tensorboard"])


def test_prometheus_target_files(tmp_path):
    run_dir, discovery = tmp_path / "runs" / "r1", tmp_path / "sd"
    run_dir.mkdir(parents=True)
    targets = T.PrometheusTargets(run_dir, "127.0.0.1", 9999, discovery_dir=str(discovery))
    entry = json.loads((discovery / "r1.json").read_text())
    assert entry == [{"targets": ["127.0.0.1:9999"], "labels": {"run": "r1", "service": "turnrl"}}]
    assert json.loads((run_dir / "prometheus_targets.json").read_text()) == entry
    targets.close()
    assert not (discovery / "r1.json").exists() and (run_dir / "prometheus_targets.json").exists()
    assert T.advertised_host("0.0.0.0", None) not in ("0.0.0.0", "")
    assert T.advertised_host("0.0.0.0", "node-7") == "node-7"
