"""Starting Ray: a local Ray gets more logical CPUs than cores, no Train preemption watcher (one machine is never
preempted) and Train's faster poll. (That the driver's RAYTUNE_SD3_* variables reach the workers of a cluster it joins
is proven by test_fault's killed run and test_tune's failed trial: they find their workers by such a variable.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json, os, sys, ray
from raytune_sd3.config import load_job
from raytune_sd3.driver.runtime import init_ray

init_ray(load_job("jobs/tiny.yaml", ["output_dir=" + sys.argv[1]]))
names = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
env = ray.get(ray.remote(lambda: [os.environ.get(n) for n in names]).remote())
print(json.dumps({"worker_env": env, "cpus": ray.cluster_resources()["CPU"]}))
"""


def test_local_ray_has_spare_logical_cpus_and_no_preemption_watcher(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    started = json.loads(r.stdout.strip().splitlines()[-1])
    assert started == {"worker_env": ["0", "0.5"], "cpus": max(4, 2 * os.cpu_count())}


def test_an_address_where_no_cluster_listens_is_one_screen_in_seconds(tmp_path):
    """RAY_ADDRESS naming a port nobody listens on: ray.init would retry it for ever (seen: still retrying after 10
    minutes, its native warnings on the console); the command exits 2 at once, naming the variable and the fix."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{port}"}
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml", "--set",
                        f"output_dir={tmp_path / 'out'}"], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"RAY_ADDRESS: no Ray cluster answers at 127.0.0.1:{port}" in r.stderr and "unset RAY_ADDRESS" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr and len((r.stdout + r.stderr).splitlines()) <= 5
