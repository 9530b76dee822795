"""Bad cluster files at the door: `python -m raytune_sd3.check JOB --cluster FILE` on a file Ray or the KubeRay operator
would refuse (or accept and then fail with) prints one `[FAIL] cluster  FILE: KEY: what, and the fix` screen and exits 2,
before the job's checks; what a shipped file leaves to the user (the image placeholder) is a warning."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytune_sd3.check import main as check_main
from raytune_sd3.cluster_files import image_ray_version

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
JOB = str(ROOT / "jobs" / "sd35.yaml")


def _yaml(path: Path, doc) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def _aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws-h100.yaml").read_text())


def _edited(name: str, change) -> dict:
    doc = copy.deepcopy(yaml.safe_load((CLUSTER / name).read_text()))
    change(doc)
    return doc


def test_image_ray_version():
    assert image_ray_version("rayproject/ray:2.60.0-py311-gpu") == "2.60.0"
    assert image_ray_version("rayproject/ray-ml:2.9.3-gpu") == "2.9.3"
    assert image_ray_version("ghcr.io/me/raytune-sd3:ray2.60.0-py311-cu128") == "2.60.0"
    assert image_ray_version("localhost:5000/raytune-sd3:ray-2.59.1") == "2.59.1"
    assert image_ray_version("localhost:5000/raytune-sd3") is None  # a registry port is no tag
    assert image_ray_version("rayproject/ray:nightly-gpu") is None
    assert image_ray_version("rayproject/ray@sha256:" + "0" * 64) is None


BAD = {
    "yaml syntax": ("syntax.yaml", "cluster_name: x\navailable_node_types:\n  head: {node_config: {InstanceType: m6\n",
                    "line 4, column 1: not valid YAML"),
    "node types as a list": ("list.yaml", _edited("aws-h100.yaml", lambda d: d.update(
        available_node_types=list(d["available_node_types"].values()))),
        "available_node_types: must be a mapping, not a list (one entry a node type"),
    "kuberay spec list": ("rc.yaml", _edited("kuberay-raycluster.yaml", lambda d: d.update(spec=[])),
                          "spec: must be a mapping (the RayCluster's settings), not a list"),
    "image of another ray": ("old.yaml", _edited("aws-h100.yaml", lambda d: d["docker"].update(
        image="rayproject/ray:2.9.3-py311-gpu")), "docker.image: rayproject/ray:2.9.3-py311-gpu runs Ray 2.9.3, "
                                                 "this project Ray "),
    "kuberay image of another ray": ("rc.yaml", _edited("kuberay-raycluster.yaml", lambda d: d["spec"][
        "workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(image="rayproject/ray:2.41.0-gpu")),
        "spec.workerGroupSpecs[0].template.spec.containers[0].image: rayproject/ray:2.41.0-gpu runs Ray 2.41.0"),
    "ttl the operator refuses": ("job.yaml", _edited("kuberay-rayjob.yaml", lambda d: d["spec"].update(
        ttlSecondsAfterFinished=3600)), "spec.ttlSecondsAfterFinished: set without shutdownAfterJobFinishes: true, "
                                        "which KubeRay >= 1.4 refuses"),
    "not a cluster file": ("pvc.yaml", yaml.safe_load((CLUSTER / "kuberay-shared-pvc.yaml").read_text()),
                           "neither a Ray cluster-launcher YAML"),
    "unknown head type": ("head.yaml", _edited("aws-h100.yaml", lambda d: d.update(head_node_type="cpu")),
                          "head_node_type: 'cpu' is none of available_node_types"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_cluster_file_is_one_clean_error(case, tmp_path, capsys):
    name, content, expected = BAD[case]
    path = tmp_path / name
    if isinstance(content, str):
        path.write_text(content)
    else:
        _yaml(path, content)
    if name == "job.yaml":  # the RayJob finds its RayCluster beside it
        (tmp_path / "kuberay-raycluster.yaml").write_text((CLUSTER / "kuberay-raycluster.yaml").read_text())
    assert check_main([JOB, "--cluster", str(path), "--skip-paths"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"[FAIL] cluster  {path}: {expected}" in err, err
    assert "Traceback" not in err


def test_through_the_command_line_no_traceback(tmp_path):
    bad = _yaml(tmp_path / "bad.yaml", _edited("kuberay-raycluster.yaml", lambda d: d.update(spec=[])))
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.check", JOB, "--cluster", str(bad), "--skip-paths"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.strip() == f"[FAIL] cluster  {bad}: spec: must be a mapping (the RayCluster's settings), not a list"


def test_a_shipped_file_warns_of_its_image_placeholder(capsys):
    assert check_main([JOB, "--cluster", str(CLUSTER / "kuberay-raycluster.yaml"), "--skip-paths"]) == 0
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("[warn] cluster")]
    assert len(warnings) == 1 and "(and 1 more): REGISTRY-CHANGE-ME/raytune-sd3:ray2.60.0-py311-cu128 is a " \
                                  "placeholder" in warnings[0], out
