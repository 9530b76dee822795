"""A simulated two-node cluster loses a node mid-run: Ray Train replaces the workers and the run finishes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_node_removed_mid_run_the_run_finishes(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "multinode_scenario.py"), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    outcome = json.loads(r.stdout.strip().splitlines()[-1])
    assert outcome["nodes_before"] == 2, outcome  # SPREAD put the workers on both nodes
    assert outcome["removed_at"] is not None and outcome["removed_at"] < 16, outcome
    assert outcome["finished"] and outcome["error"] is None, outcome
    assert outcome["final_step"] == 16 and outcome["steps"] == list(range(17)), outcome
