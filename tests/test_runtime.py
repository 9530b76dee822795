"""Starting Ray: a local Ray gets more logical CPUs than cores and no Train preemption watcher (one machine is
never preempted)."""

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
env = ray.get(ray.remote(lambda: os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")).remote())
print(json.dumps({"worker_env": env, "cpus": ray.cluster_resources()["CPU"]}))
"""


def test_local_ray_has_spare_logical_cpus_and_no_preemption_watcher(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")}
    r = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    started = json.loads(r.stdout.strip().splitlines()[-1])
    assert started == {"worker_env": "0", "cpus": max(4, 2 * os.cpu_count())}
