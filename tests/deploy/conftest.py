"""Helpers for the deployment tests: free ports, a real Ray head on loopback, a real Prometheus.

Processes are started in their own session and stopped by their own process id/group only:
``ray stop`` would kill every Ray on the machine, so the head runs as ``ray start --block`` and
is stopped with SIGTERM (Ray then shuts its children down itself).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    """Environment for the Ray head, the CLI and the job: this venv first on PATH, CPU DeepSpeed, no usage
    stats, and Ray token authentication with a token of this test's own (Ray >= 2.5x enables token auth
    by default when ~/.ray/auth_token exists, but its job CLI only sends a token in explicit token mode)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=secrets.token_hex(32))
    return env


def stop_process(proc: subprocess.Popen, grace_s: float = 60.0) -> None:
    """SIGTERM the process we started, then SIGKILL its own process group if anything is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # our own session (start_new_session=True): pgid == pid
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 300
    except (OSError, urllib.error.URLError):
        return False


def wait_for(predicate, what: str, timeout_s: float, proc: subprocess.Popen | None = None, log: Path | None = None,
             interval_s: float = 1.0):
    """Poll ``predicate`` until true; fail naming ``what`` (and the process log) on timeout or exit."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise RuntimeError(f"{what}: process exited with {proc.returncode}\n{tail}")
        time.sleep(interval_s)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what}: not ready after {timeout_s:.0f} s\n{tail}")


def _prometheus_path() -> str | None:
    return shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").is_file() else None)


def ensure_prometheus() -> tuple[str | None, str]:
    """Path of a ``prometheus`` binary, installing the Debian package when missing (root + apt-get).

    Returns ``(path, "")`` or ``(None, reason)``.
    """
    found = _prometheus_path()
    if found:
        return found, ""
    if not shutil.which("apt-get"):
        return None, "the prometheus binary is missing and apt-get is not available to install it"
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        return None, "the prometheus binary is missing and installing the Debian package needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "prometheus"]
    out = ""
    for cmd in (install, ["apt-get", "update", "-q"], install):
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"`{' '.join(cmd)}` failed: {e}"
        out = (r.stdout + r.stderr)[-1500:]
        if cmd is install and r.returncode == 0 and _prometheus_path():
            return _prometheus_path(), ""
    return None, f"could not install the Debian package prometheus:\n{out}"
