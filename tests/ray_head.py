"""Starting, stopping and killing private Ray nodes with `ray start` for the `ray job submit` test (test_cluster.py's
two-node cluster), and what that took with Ray 2.60.

Other Ray clusters may run on the same machine: every port of the head that has a fixed default is chosen free,
its temp dir is private, and teardown signals only processes of this head (never `ray stop`).

What Ray 2.60 needed, found by experiment:
- A head started with RAY_AUTH_MODE=token answers every dashboard HTTP route, /api/version included, with 401
  unless the request carries `Authorization: Bearer <token>`.
- The `ray job` CLI needs RAY_AUTH_MODE=token itself: with a token available (RAY_AUTH_TOKEN, or
  ~/.ray/auth_token) but the mode unset it reports "Note: RAY_AUTH_MODE is currently 'disabled'" and sends no
  token. (Ray turns token mode on by itself only when it starts a local cluster and ~/.ray/auth_token exists.)
- `ray start --head` with RAY_AUTH_MODE=token and no token anywhere exits at once with AuthenticationError: it does
  not generate ~/.ray/auth_token (a local ray.init() and `ray get-auth-token --generate` do).
- RAY_AUTH_TOKEN takes precedence over ~/.ray/auth_token on the head and on clients (a head started with
  RAY_AUTH_TOKEN=X rejects the file's token as "invalid"). So the test makes its own token and hands it to the
  head and to the CLI in the environment: it neither needs nor touches ~/.ray/auth_token, which other Ray users
  of this machine share. The job's driver and Ray's workers inherit the head's environment, token included.
- On SIGTERM, `ray start --block` first drains the node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (default 30 s),
  which with the GCS already killed by the group signal just waits out the timeout; 0 makes teardown take seconds.
- Besides --port (6379), --dashboard-port (8265) and --ray-client-server-port (10001; 0 is refused), two ports
  have fixed defaults: the dashboard agent's HTTP port (52365; a second head there gets an agent whose "HTTP
  service will be disabled") and the dashboard's Prometheus port (44227, env DASHBOARD_METRIC_PORT; the second
  head logs an exception). Both are chosen free here too.
- On a 2-core machine loaded by other work the dashboard took over 60 s to come up, and `ray start` gives up on it
  after RAY_DASHBOARD_STARTUP_TIMEOUT_S (60): the head env raises that to HEAD_START_S. The Ray Client server,
  started before the dashboard, waits a hard-coded 30 s for the raylet (started after it) to register, to learn
  the runtime-env agent's self-assigned port; when the dashboard is slow it dies ("Timed out waiting for node
  info") and `ray start --block` kills the whole head. A fixed --runtime-env-agent-port skips that wait.
- /api/version answers before the head's dashboard agent has registered in the GCS; a job submitted then gets
  HTTP 500 "No available agent to submit job, please try again later" (after a 10 s wait) and is not created,
  so the submit is retried on exactly that message.
- Ray workers (ray::IDLE, actors) run in process groups of their own: killpg on the head's group does not reach
  them. They stay in the head's session, inherit its environment (with the marker variable below) and exit once
  the raylet is gone; the sweep after killpg finds and kills any that have not.
- `ray job submit` uploads the working dir minus .gitignore'd paths and .git (it warns that .git is now excluded
  by default); `excludes` in --runtime-env-json adds more, and --working-dir replaces only its working_dir. Env vars in the job's runtime_env are also what `init_ray` must not pass again
  (Ray refuses a driver runtime_env that repeats a job env var); the job sets two of them to cover that.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray") if (BIN / "ray").exists() else (shutil.which("ray") or "ray")
MARKER = "RAYTUNE_SD3_TEST_HEAD"  # env var every process of our head inherits: finds stragglers for the teardown
HEAD_START_S = 120  # ~90 s is plenty on an idle machine; a busy one needed more
JOB_TIMEOUT_S = 400
NO_AGENT = "No available agent to submit job"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):  # held open together, so the n ports differ
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _our_pids(marker_value: str, session: int) -> list[int]:
    """Live processes of our head: in its session, or with our marker in their environment."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
            if fields[0] == "Z":
                continue
            if int(fields[3]) == session or f"{MARKER}={marker_value}".encode() in (d / "environ").read_bytes():
                pids.append(int(d.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return pids


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _stop_head(proc: subprocess.Popen, marker_value: str) -> tuple[int, list[str]]:
    """Stop our head and everything it started. Returns how many of its processes outlived `ray start` and
    those still alive 10 s later (which the sweep then kills)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
    # Workers sit in process groups of their own; give them a moment to follow the raylet, then sweep.
    outlived = len(_our_pids(marker_value, proc.pid))
    deadline = time.monotonic() + 10
    while (left := _our_pids(marker_value, proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)
    stragglers = []
    for pid in left:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stragglers.append(f"{pid} {cmdline[:120]}")
        except OSError:
            pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        _signal_all(left, sig)
        deadline = time.monotonic() + 10
        while (left := _our_pids(marker_value, proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.5)
    return outlived, stragglers


def _kill_node(proc: subprocess.Popen, marker_value: str) -> None:
    """A node lost as a machine that loses power: SIGKILL to every process of it at once, workers included."""
    _signal_all(_our_pids(marker_value, proc.pid), signal.SIGKILL)
    proc.wait(timeout=30)


def start_head(log: Path, *args: str, env: dict[str, str] | None = None):
    """A `ray start --block --head` of our own (token auth, every port free, a private temp dir, 4 CPUs unless `args`
    say otherwise), up once its dashboard answers. Yields the environment that reaches it (RAY_ADDRESS, the token);
    stops the head and everything it started on exit. A generator: wrap it in contextlib.contextmanager or yield
    from it in a fixture."""
    import secrets
    import tempfile

    gcs, dash, client, agent, env_agent, metrics_port = _free_ports(6)
    temp_dir = tempfile.mkdtemp(prefix="rth-", dir="/tmp")
    token, marker = secrets.token_hex(32), secrets.token_hex(8)
    head_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    head_env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HF_HUB_OFFLINE": "1",
                     "TOKENIZERS_PARALLELISM": "false", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                     "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(HEAD_START_S), "DASHBOARD_METRIC_PORT": str(metrics_port),
                     "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})})
    cpus = [] if any(a.startswith("--num-cpus") for a in args) else ["--num-cpus=4"]
    with open(log, "wb") as f:
        head = subprocess.Popen(
            [RAY, "start", "--block", "--disable-usage-stats", "--head", f"--port={gcs}", f"--dashboard-port={dash}",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
             f"--runtime-env-agent-port={env_agent}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
             f"--temp-dir={temp_dir}", *cpus, *args],
            env={**head_env, MARKER: marker}, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    try:
        _wait_for_dashboard(head, dash, token, log)
        yield {**head_env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    finally:
        _stop_head(head, marker)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_dashboard(proc: subprocess.Popen, port: int, token: str, log: Path) -> None:
    url = f"http://127.0.0.1:{port}/api/version"
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + HEAD_START_S
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                if r.status == 200 and json.loads(r.read()).get("ray_version"):
                    return
        except (OSError, ValueError) as e:  # refused while starting; HTTPError (401...) is an OSError too
            last = e
        time.sleep(1)
    pytest.fail(f"dashboard at {url} did not answer in {HEAD_START_S}s (last: {last!r}):\n{log.read_text()[-4000:]}")
