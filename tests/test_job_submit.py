"""End to end: `ray job submit` of the tiny job to a Ray head that this test starts, and stops, itself.

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
  RAY_AUTH_TOKEN=X rejects the file's token as "invalid"). So this test makes its own token and hands it to the
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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


@pytest.mark.slow
def test_ray_job_submit_tiny(tmp_path):
    gcs_port, dash_port, client_port, agent_port, env_agent_port, metrics_port = _free_ports(6)
    temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 chars
    token = secrets.token_hex(32)  # what `ray get-auth-token --generate` makes
    marker_value = secrets.token_hex(8)
    out, demo, home = tmp_path / "out", tmp_path / "demo", tmp_path / "home"

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAYTUNE_SD3_HOME": str(home),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(HEAD_START_S),
        "DASHBOARD_METRIC_PORT": str(metrics_port),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job's `python` is this interpreter
    })
    head_env = {**env, MARKER: marker_value}

    head_log = tmp_path / "head.log"
    t0 = time.monotonic()
    with open(head_log, "wb") as log_f:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
             f"--ray-client-server-port={client_port}", f"--dashboard-agent-listen-port={agent_port}",
             f"--runtime-env-agent-port={env_agent_port}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=4", f"--temp-dir={temp_dir}",
             "--disable-usage-stats"],
            env=head_env, stdout=log_f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    try:
        _wait_for_dashboard(proc, dash_port, token, head_log)
        print(f"\nhead up in {time.monotonic() - t0:.0f}s (gcs {gcs_port}, dashboard {dash_port}, {temp_dir})")

        runtime_env = {
            "excludes": ["outputs", ".git", "*.safetensors", ".pytest_cache", ".ruff_cache", ".benchmarks"],
            "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        }
        # data.datasets.0.x does not work with --set (it makes a dict, not a list item): replace the list.
        dataset = (f"[{{id: shapes, type: demo, instance_data_dir: '{demo}', resolution: 64, "
                   f"demo_images: 12}}]")
        cmd = [
            RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash_port}", "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps(runtime_env), "--log-color", "false", "--",
            "python", "-m", "raytune_sd3.train", "jobs/tiny.yaml",
            "--set", f"output_dir={out}",
            "--set", f"data.datasets={dataset}",
            "--set", "data.eval_samples=4",
            "--set", "data.encode_actors=1",
            "--set", "data.encode_batch_size=16",
            "--set", "train.max_steps=4",
            "--set", "train.lr_warmup_steps=1",
            "--set", "train.checkpoint_every=2",
            "--set", "train.eval_every=2",
            "--set", "validation.steps=2",
        ]
        t1 = time.monotonic()
        agent_deadline = t1 + HEAD_START_S
        while True:
            try:
                job = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True,
                                     timeout=JOB_TIMEOUT_S)
            except subprocess.TimeoutExpired as e:
                tail = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
                pytest.fail(f"ray job submit did not finish in {JOB_TIMEOUT_S}s:\n{tail[-6000:]}")
            output = job.stdout + job.stderr
            # The dashboard answers before the head's dashboard agent has registered; until then the job head
            # waits 10 s and refuses the job (nothing is submitted), so it is safe to submit again.
            if job.returncode == 0 or NO_AGENT not in output or time.monotonic() > agent_deadline:
                break
            print("no job agent yet; submitting again")
            time.sleep(2)
        (tmp_path / "job.log").write_text(output)
        print(f"job finished in {time.monotonic() - t1:.0f}s with {job.returncode}")
        if proc.poll() is not None:
            output += f"\n--- the Ray head exited with {proc.returncode}:\n{head_log.read_text()[-4000:]}"
        assert job.returncode == 0, output[-8000:]
        assert "succeeded" in output.lower(), output[-8000:]

        assert (out / "pytorch_lora_weights.safetensors").is_file()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train_records = [r for r in records if "loss" in r]
        assert len(train_records) == 4, records
        assert [r["step"] for r in train_records] == [1, 2, 3, 4]
        assert len(list((out / "validation").glob("step_*/*.png"))) == 2  # the 2 prompts of jobs/tiny.yaml
    finally:
        outlived, stragglers = _stop_head(proc, marker_value)
        print(f"head stopped; whole test {time.monotonic() - t0:.0f}s; {outlived} processes outlived `ray start`, "
              f"still alive 10 s later (killed): {stragglers or 'none'}")
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not _our_pids(marker_value, proc.pid), "processes of the test's Ray head survived the teardown"
