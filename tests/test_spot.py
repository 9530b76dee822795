"""Spot and preemptible nodes: when Ray says a node will be drained for preemption (the GCS's DrainNode with reason
PREEMPTION and a deadline, what a SIGTERM'd `ray start --block`, e.g. a KubeRay pod being evicted, sends itself), the
workers checkpoint at once; at the deadline Ray Train restarts them elsewhere, and the run resumes from that
checkpoint, not the last periodic one, with train.max_failures: 0, because Ray Train charges such restarts to
FailureConfig.max_preemption_failures."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import DEMO_IMAGES

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY, NOTICE_AFTER = 100, 80, 3  # one periodic checkpoint (80): the notice comes well before it
DEADLINE_S = 3  # the node's drain deadline: Train restarts the workers then (long before step 100)


def _drain_for_preemption(address: str, node_id: str, deadline_s: float) -> None:
    """Ray's own drain API (what a node that gets SIGTERM sends itself: ray/_private/node.py), as a cloud's
    reclaim notice: the node is draining, and goes at the deadline."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    accepted, why = ray._raylet.GcsClient(address=address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), "spot reclaim (test)",
        int((time.time() + deadline_s) * 1000))
    assert accepted, why


def _node_whose_cpus_are_taken(address: str, nodes: set[str]) -> str:
    """The one node of `nodes` whose CPUs are in use (the training worker's), as the GCS's resource view says."""
    import ray._raylet

    usage = ray._raylet.GcsClient(address=address).get_all_resource_usage().resource_usage_data.batch
    busy = [n.node_id.hex() for n in usage
            if n.node_id.hex() in nodes and n.resources_available["CPU"] < n.resources_total["CPU"]]
    assert len(busy) == 1, busy
    return busy[0]


@pytest.mark.slow
def test_drain_notice_checkpoints_at_once_and_the_restart_is_not_a_failure(tmp_path, demo_cache, monkeypatch):
    from ray.cluster_utils import Cluster

    fast_death = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                  "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    monkeypatch.setenv("RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "0.2")  # Train's watcher polls the GCS this often
    address_file = Path("/tmp/ray/ray_current_cluster")  # Cluster() records its address there, for other users too
    saved_address = address_file.read_bytes() if address_file.exists() else None
    # Head: the driver, Train's controller, the cache's encoders (2 CPUs: no room for the 3-CPU training worker).
    # Two 3-CPU nodes: the worker's is drained, the restart goes to the other one. Both are there from the start: a
    # node added at the notice took long enough on a loaded machine (10-20 s) for the run to pass its periodic
    # checkpoint before the drain, which the restart then rightly resumed from.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "_system_config": fast_death})
    try:
        spot_nodes = {cluster.add_node(num_cpus=3).node_id for _ in range(2)}
        if saved_address is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_bytes(saved_address)
        sets = [f"output_dir={tmp_path / 'out'}", f"data.cache_dir={demo_cache}",
                f"data.datasets.0.instance_data_dir={tmp_path / 'demo'}", f"data.datasets.0.demo_images={DEMO_IMAGES}",
                f"train.max_steps={STEPS}", f"train.checkpoint_every={EVERY}", f"train.eval_every={EVERY}",
                "train.max_failures=0", "train.num_workers=1", "train.cpus_per_worker=3", "validation.prompts=[]",
                f"ray.address={cluster.address}"]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        proc = subprocess.Popen([sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml",
                                 *[a for s in sets for a in ("--set", s)]], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        metrics = tmp_path / "out" / "metrics.jsonl"
        drained = None
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None and drained is None:
            steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()] if metrics.exists() else []
            if steps and max(steps) >= NOTICE_AFTER:
                drained = _node_whose_cpus_are_taken(cluster.address, spot_nodes)
                _drain_for_preemption(cluster.address, drained, deadline_s=DEADLINE_S)
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=600)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, out[-5000:]  # with max_failures: 0, a charged restart would have failed the run
    assert drained is not None, f"the run ended before the notice:\n{out[-5000:]}"
    m = re.search(rf"preemption notice for node\(s\) {drained} \(ranks \[0\], \d+ s left\): checkpoint at step (\d+)",
                  out)
    assert m, out[-5000:]
    taken = int(m.group(1))
    assert NOTICE_AFTER <= taken < EVERY  # not a periodic one, and before the only periodic one
    assert f"resuming from step {taken}" in out, out[-5000:]  # the restart resumed from the notice's checkpoint
    logged = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(STEPS + 1))  # every step once (0: the initial eval)
