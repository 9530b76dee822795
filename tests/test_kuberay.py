"""The KubeRay operator's rules (raytune_sd3/kuberay.py) on the shipped manifests: each edit the operator (1.1 to 1.7)
would refuse, or accept into a cluster that cannot work, is named by its key; the shipped ones pass."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from raytune_sd3 import kuberay
from raytune_sd3.cluster_files import ClusterFileError, ray_version, read_cluster_file
from raytune_sd3.kuberay_fields import FIELDS

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
RC, JOB = "kuberay-raycluster.yaml", "kuberay-rayjob.yaml"


def manifest(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def problems(doc: dict) -> list[str]:
    """The keys the checks name, for a RayCluster or a RayJob on the shipped RayCluster."""
    found, _ = kuberay.schema_problems(doc)
    if found:
        return [k for k, _ in found]
    if doc["kind"] == "RayCluster":
        return [k for k, _ in kuberay.cluster_problems(doc["spec"], "spec", ray_version())]
    return [k for k, _ in kuberay.job_problems(doc["spec"], manifest(RC)["spec"])]


def _used_paths(value, path: str = "spec") -> set[str]:
    found = {path}
    if isinstance(value, dict):
        for k, v in value.items():
            found |= _used_paths(v, f"{path}.{k}")
    elif isinstance(value, list):
        for v in value:
            found |= _used_paths(v, path + "[]")
    return found


@pytest.mark.parametrize("name", [RC, JOB])
def test_every_field_we_use_is_in_the_oldest_crd_with_its_type(name):
    """Field names (and, by schema_problems, types) of every field the manifest sets, in the CRDs of KubeRay 1.1 to
    1.7; maps (rayStartParams, nodeSelector, resources) hold their own keys."""
    doc = manifest(name)
    table = FIELDS[doc["kind"]]
    maps = [p for p, (kind, _, _) in table.items() if kind.startswith("map of")]
    for path in _used_paths(doc["spec"]):
        if any(path.startswith(m + ".") for m in maps):
            continue
        assert path in table, path
        assert table[path][1:] == ("1.1", None), (path, table[path])  # known to every operator the files name
    assert kuberay.schema_problems(doc) == ([], [])


def test_shipped_manifests_pass():
    assert problems(manifest(RC)) == [] and problems(manifest(JOB)) == []


def _edit(name: str, change) -> dict:
    doc = copy.deepcopy(manifest(name))
    change(doc["spec"])
    return doc


def _worker(spec: dict) -> dict:
    return spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


REFUSED = {
    # validateDeletionConfiguration: a TTL without shutdownAfterJobFinishes (KubeRay >= 1.4), as the file once had
    "ttl without shutdown": (JOB, lambda s: s.update(ttlSecondsAfterFinished=3600), ["spec.ttlSecondsAfterFinished"]),
    "negative ttl": (JOB, lambda s: s.update(ttlSecondsAfterFinished=-1, shutdownAfterJobFinishes=True),
                     ["spec.ttlSecondsAfterFinished"]),
    "no cluster": (JOB, lambda s: s.pop("clusterSelector"), ["spec"]),
    "sidecar with selector": (JOB, lambda s: s.update(submissionMode="SidecarMode"), ["spec.submissionMode"]),
    "suspended selector job": (JOB, lambda s: s.update(suspend=True, shutdownAfterJobFinishes=True), ["spec.suspend"]),
    "runtime env not a mapping": (JOB, lambda s: s.update(runtimeEnvYAML="- pip"), ["spec.runtimeEnvYAML"]),
    # the head has num-cpus 0: a driver that asks for CPUs has nowhere to go
    "driver asks cpus": (JOB, lambda s: s.update(entrypointNumCpus=1), ["spec.entrypointNumCpus"]),
    # the autoscaler sidecar without the token cannot reach GCS (pod.go)
    "autoscaler without token": (RC, lambda s: s["autoscalerOptions"].pop("env"), ["spec.autoscalerOptions.env"]),
    "autoscaler without mode": (RC, lambda s: s["autoscalerOptions"]["env"].pop(0), ["spec.autoscalerOptions.env"]),
    "other ray": (RC, lambda s: s.update(rayVersion="2.50.0"), ["spec.rayVersion"]),
    "half a gpu": (RC, lambda s: _worker(s)["resources"].update(limits={"cpu": "24", "nvidia.com/gpu": "0.5"},
                                                                  requests={"cpu": "24", "nvidia.com/gpu": "0.5"}),
                   ["spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu",
                    "spec.workerGroupSpecs[0].template.spec.containers[0].resources.requests.nvidia.com/gpu"]),
    "requests differ": (RC, lambda s: _worker(s)["resources"]["requests"].update({"nvidia.com/gpu": 2}),
                        ["spec.workerGroupSpecs[0].template.spec.containers[0].resources"]),
    "both resources": (RC, lambda s: s["headGroupSpec"].update(resources={"CPU": "0"}), ["spec.headGroupSpec.resources"]),
    "suspended group": (RC, lambda s: s["workerGroupSpecs"][0].update(suspend=True), ["spec.workerGroupSpecs[0].suspend"]),
    # the CRD's types and names
    "unquoted num-cpus": (RC, lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                          ["spec.headGroupSpec.rayStartParams.num-cpus"]),
    "typo": (RC, lambda s: s.update(workerGroupSpec=s.pop("workerGroupSpecs")), ["spec.workerGroupSpec"]),
    "replicas as text": (RC, lambda s: s["workerGroupSpecs"][0].update(replicas="three"),
                         ["spec.workerGroupSpecs[0].replicas"]),
    "groups as a mapping": (RC, lambda s: s.update(workerGroupSpecs={"gpu": {}}), ["spec.workerGroupSpecs"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_each_refused_edit_is_named(case):
    name, change, keys = REFUSED[case]
    assert problems(_edit(name, change)) == keys


def test_authoptions_stand_in_for_the_autoscaler_env_and_need_a_newer_operator():
    doc = _edit(RC, lambda s: (s["autoscalerOptions"].pop("env"), s.update(authOptions={"mode": "token"})))
    assert problems(doc) == []
    assert kuberay.schema_problems(doc)[1] == [("spec.authOptions", "needs KubeRay operator >= 1.5.1 (older "
                                                                    "operators drop the field)")]
    old_ray = _edit(RC, lambda s: s.update(authOptions={"mode": "token"}, rayVersion="2.50.0"))
    assert "spec.authOptions" in [k for k, _ in kuberay.cluster_problems(old_ray["spec"], "spec", "2.50.0")]


def test_a_manifest_file_is_refused_with_every_key(tmp_path):
    (tmp_path / RC).write_text(yaml.safe_dump(_edit(RC, lambda s: (s.update(rayVersion="2.9.0"),
                                                                   s["autoscalerOptions"].pop("env")))))
    with pytest.raises(ClusterFileError) as e:
        read_cluster_file(tmp_path / RC)
    lines = str(e.value).splitlines()
    assert [line.split(": ")[1] for line in lines] == ["spec.rayVersion", "spec.autoscalerOptions.env"]
    assert all(line.startswith(f"{tmp_path / RC}: ") for line in lines)
