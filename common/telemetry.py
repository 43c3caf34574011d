"""Where the metrics go: ``metrics.jsonl``, the Prometheus endpoint (with its file_sd target), and the
trackers of ``metrics.report_to`` (TensorBoard, W&B) through their own libraries.

The names, help strings and Prometheus types are ``common.metrics``'s; this module only writes them out.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from common.metrics import METRICS, prometheus_kind, prometheus_name

log = logging.getLogger(__name__)


#: histogram buckets of the step-phase durations (seconds): CPU demo steps to cluster steps
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class _Exposition:
    """A Prometheus collector over the latest logged values: counters, gauges and duration histograms.

    The driver logs absolute running totals (they survive actor restarts and resumes as state), so
    counters are exported from those values rather than incremented (a custom collector, as the
    client library recommends for values tracked elsewhere).
    """

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.hist: dict[str, tuple[list[int], list[float]]] = {}  # name -> (bucket counts, [sum])

    def update(self, values: dict[str, Any]) -> None:
        for name, value in values.items():
            if name not in METRICS or value is None:
                continue
            try:
                v = float(value)
            except (TypeError, ValueError):
                continue
            if prometheus_kind(name) == "histogram":
                counts, total = self.hist.setdefault(name, ([0] * (len(DURATION_BUCKETS) + 1), [0.0]))
                k = next((i for i, le in enumerate(DURATION_BUCKETS) if v <= le), len(DURATION_BUCKETS))
                counts[k] += 1
                total[0] += v
            else:
                self.values[name] = v

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        empty = ([0] * (len(DURATION_BUCKETS) + 1), [0.0])
        for name in sorted(METRICS):  # counters and histograms from the start (at 0), gauges once logged
            kind, prom = prometheus_kind(name), prometheus_name(name)
            if kind == "counter":
                yield CounterMetricFamily(prom[: -len("_total")], METRICS[name], value=self.values.get(name, 0.0))
            elif kind == "gauge" and name in self.values:
                yield GaugeMetricFamily(prom, METRICS[name], value=self.values[name])
            elif kind == "histogram":
                yield self._histogram(name, *self.hist.get(name, empty))

    @staticmethod
    def _histogram(name: str, counts: list[int], total: list[float]):
        from prometheus_client.core import HistogramMetricFamily

        cum, buckets = 0, []
        for le, c in zip([*map(str, DURATION_BUCKETS), "+Inf"], counts):
            cum += c
            buckets.append((le, cum))
        return HistogramMetricFamily(prometheus_name(name), METRICS[name], buckets=buckets, sum_value=total[0])


REPORT_TO = ("tensorboard", "wandb")  # metrics.report_to: trackers beside metrics.jsonl, through their own libraries


def check_report_to(report_to: list[str]) -> None:
    """``ValueError`` naming the package when a tracker of ``metrics.report_to`` is not installed (before Ray)."""
    import importlib.util

    need = {"tensorboard": "tensorboard", "wandb": "wandb"}
    for name in report_to:
        if importlib.util.find_spec(need[name]) is None:
            raise ValueError(f"metrics.report_to has {name!r} but the {need[name]!r} package is not installed "
                             f"(pip install {need[name]}, or pip install 'turnrl[tracking]')")


class _TensorBoard:
    """Scalars under ``<run_dir>/tensorboard`` through ``torch.utils.tensorboard``."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any] | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        if config:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, v in values.items():
            self.writer.add_scalar(name, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A W&B run through the ``wandb`` library; offline mode writes ``<run_dir>/wandb`` (``wandb sync`` uploads it)."""

    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any] | None, project: str,
                 mode: str) -> None:
        import wandb

        self.run = wandb.init(project=project, name=run_name, dir=str(run_dir), config=config or {}, mode=mode)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()  # finish() returns before wandb's service has written the run file; this waits for it


class MetricsSink:
    """Writes step metrics to ``metrics.jsonl``, serves them on a Prometheus endpoint (counters, gauges,
    duration histograms) and hands them to the trackers of ``metrics.report_to`` (TensorBoard, W&B)."""

    def __init__(self, run_dir: str | Path, *, enabled: bool = True, host: str = "127.0.0.1", port: int = 0,
                 report_to: list[str] | tuple[str, ...] = (), run_name: str = "turnrl",
                 config: dict[str, Any] | None = None, wandb_project: str = "turnrl",
                 wandb_mode: str = "offline"):
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.registry = CollectorRegistry()
        self._exposition = _Exposition()
        self.port: int | None = None
        self._server = None
        if enabled:
            self.registry.register(self._exposition)
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
            self.port = self._server.server_port
            self.host = host
            log.info("metrics served on http://%s:%d/metrics", host, self.port)
        self._trackers: list[Any] = []
        for name in report_to:
            if name not in REPORT_TO:
                raise ValueError(f"metrics.report_to: unknown tracker {name!r}; use {list(REPORT_TO)}")
            self._trackers.append(_TensorBoard(run_dir, run_name, config) if name == "tensorboard"
                                  else _WandB(run_dir, run_name, config, wandb_project, wandb_mode))

    def log(self, step: int, values: dict[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **{k: _num(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        self._exposition.update(values)
        if self._trackers:
            numeric = {k: v for k, v in record.items() if k not in ("step", "time") and isinstance(v, float)
                       and math.isfinite(v)}
            for tracker in self._trackers:
                tracker.log(step, numeric)

    def close(self) -> None:
        for tracker in self._trackers:
            tracker.close()
        self._trackers = []
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _num(v: Any) -> Any:
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


# --- discovery: the run's endpoint as a Prometheus file_sd target ------------------------------------
def advertised_host(host: str, advertise: str | None) -> str:
    """The host Prometheus should dial: ``advertise``, else ``host``, else this node's IP for 0.0.0.0."""
    if advertise:
        return advertise
    if host in ("0.0.0.0", "::", ""):
        try:
            import ray

            return ray.util.get_node_ip_address()
        except Exception:  # noqa: BLE001
            return socket.gethostbyname(socket.gethostname())
    return host


class PrometheusTargets:
    """``<run_dir>/prometheus_targets.json`` and, while the run lives, ``<discovery_dir>/<run>.json``.

    Both hold one Prometheus ``file_sd`` entry: ``[{"targets": ["host:port"], "labels": {"run": ...}}]``.
    The discovery copy is written atomically (Prometheus watches the folder) and removed at close.
    """

    def __init__(self, run_dir: Path, host: str, port: int, *, discovery_dir: str | None,
                 advertise: str | None = None):
        self.run = run_dir.name
        entry = [{"targets": [f"{advertised_host(host, advertise)}:{port}"],
                  "labels": {"run": self.run, "service": "turnrl"}}]
        text = json.dumps(entry, indent=1) + "\n"
        (run_dir / "prometheus_targets.json").write_text(text)
        self.path: Path | None = None
        if discovery_dir:
            d = Path(discovery_dir)
            try:
                d.mkdir(parents=True, exist_ok=True)
                tmp = d / f".{self.run}.{os.getpid()}.tmp"
                tmp.write_text(text)
                tmp.replace(d / f"{self.run}.json")
                self.path = d / f"{self.run}.json"
                log.info("Prometheus target %s written to %s", entry[0]["targets"][0], self.path)
            except OSError as e:
                log.warning("could not write the Prometheus target file in %s: %s", d, e)

    def close(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None
