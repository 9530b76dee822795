"""Cluster files (cluster/*.yaml, or the user's own): a Ray cluster-launcher YAML, or KubeRay RayCluster / RayJob
manifests. `read_cluster_file` reads one and refuses, in one message of `FILE: KEY: what is wrong, and the fix`
lines, what `ray up` or the KubeRay operator would refuse later, or accept and then fail with (another Ray in the
image); `cluster_gpus` gives its GPU workers, which the preflight checks a job against.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import yaml

from raytune_sd3 import kuberay
from raytune_sd3.hardware import GIB, GPU_GIB, gpu_of_node_type

PLACEHOLDER = "CHANGE-ME"  # in the shipped files' image and shared storage: the user sets them once
KUBERAY_KINDS = ("RayCluster", "RayJob")


class ClusterFileError(ValueError):
    """A cluster file that cannot be used as it is: one `FILE: KEY: what is wrong, and the fix` line a problem."""

    def __init__(self, path: Path | str, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{path}: {key}: {text}" if key else f"{path}: {text}" for key, text in problems))


@dataclass
class ClusterGPUs:
    """The GPU workers a cluster file describes."""

    source: str
    node_type: str
    gpu: str
    gpus_per_node: int
    max_nodes: int

    @property
    def gpu_bytes(self) -> float:
        return GPU_GIB[self.gpu] * GIB


@dataclass
class ClusterFile:
    path: Path
    docs: list[dict]
    warnings: list[str] = field(default_factory=list)

    @property
    def launcher(self) -> dict | None:
        return next((d for d in self.docs if "available_node_types" in d), None)

    def manifest(self, kind: str) -> dict | None:
        return next((d for d in self.docs if d.get("kind") == kind), None)


def ray_version() -> str:
    """The Ray this project pins and runs (pyproject.toml); read without importing ray."""
    return version("ray")


def image_ray_version(image: str) -> str | None:
    """The Ray version an image's tag names: rayproject/ray:2.60.0-py311-gpu, or ours (docker/Dockerfile):
    .../raytune-sd3:ray2.60.0-py311-cu128. None when the tag does not say (latest, nightly, a digest)."""
    name, _, tag = image.split("@")[0].rpartition(":")
    if not name or "/" in tag:  # no tag (a registry port is not one)
        return None
    if name.rsplit("/", 1)[-1] in ("ray", "ray-ml"):
        m = re.match(r"(\d+\.\d+\.\d+)", tag)
    else:
        m = re.search(r"ray-?(\d+\.\d+\.\d+)", tag)
    return m.group(1) if m else None


def _image_problems(found: list[tuple[str, str]], ours: str) -> tuple[list[tuple[str, str]], list[str]]:
    problems, warnings = [], []
    for image in dict.fromkeys(image for _, image in found if PLACEHOLDER in image):
        keys = [k for k, i in found if i == image]
        warnings.append(f"{keys[0]}{f' (and {len(keys) - 1} more)' if len(keys) > 1 else ''}: {image} is a "
                        "placeholder: build docker/Dockerfile, push it, and put your registry in its place "
                        "(cluster/README.md)")
    for key, image in found:
        theirs = image_ray_version(image)
        if theirs is None:
            if PLACEHOLDER not in image:
                warnings.append(f"{key}: {image}: its tag names no Ray version; it must run Ray {ours}")
        elif theirs != ours:
            problems.append((key, f"{image} runs Ray {theirs}, this project Ray {ours} (pyproject.toml), and Ray "
                                  f"refuses to join nodes of two versions: use an image of Ray {ours} "
                                  f"(rayproject/ray:{ours}-py311-gpu, or docker/Dockerfile's)"))
    return problems, warnings


def _load(path: Path) -> list:
    try:
        text = path.read_text()
    except OSError as e:
        raise ClusterFileError(path, [("", f"cannot be read ({e.strerror}): give a cluster file such as "
                                           "cluster/aws-h100.yaml")]) from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ClusterFileError(path, [(where, f"not valid YAML ({what}): fix the syntax there (indentation, a "
                                              "missing ':' or an unclosed quote or bracket)")]) from None


def _launcher_problems(doc: dict) -> list[tuple[str, str]]:
    """Ray's own cluster-YAML schema (ray/autoscaler/ray-schema.json, what `ray up` validates against), then the
    head node type."""
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    problems = []
    for e in errors[:5]:
        key = ".".join(str(p) for p in e.absolute_path)
        if e.validator == "type":
            text = f"must be {kuberay.WORDS.get(e.validator_value, e.validator_value)}, not {kuberay.yaml_type_name(e.instance)}"
            if key == "available_node_types":
                text += " (one entry a node type: `name: {node_config: ..., resources: ..., max_workers: N}`)"
        elif e.validator == "additionalProperties":
            text = f"{e.message.split('(')[-1].rstrip(')')}: check the spelling (Ray's cluster YAML reference)"
        else:
            text = e.message[:300]
        problems.append((key, text))
    if not problems and doc.get("head_node_type") not in doc["available_node_types"]:
        problems.append(("head_node_type", f"{doc.get('head_node_type')!r} is none of available_node_types "
                                           f"({', '.join(doc['available_node_types'])})"))
    return problems


def _launcher_images(doc: dict) -> list[tuple[str, str]]:
    found = [(f"docker.{k}", v) for k, v in (doc.get("docker") or {}).items() if k in ("image", "head_image",
                                                                                        "worker_image")]
    for name, node in doc["available_node_types"].items():
        found += [(f"available_node_types.{name}.docker.{k}", v) for k, v in (node.get("docker") or {}).items()
                  if k in ("worker_image", "head_image")]
    return found


def _kuberay_check(path: Path, docs: list[dict], ours: str) -> tuple[list[tuple[str, str]], list[str]]:
    problems, warnings = [], []
    for doc in docs:
        kind = doc["kind"]
        prefix = f"{kind} " if len(docs) > 1 else ""
        found, notes = kuberay.schema_problems(doc)
        warnings += [f"{prefix}{k}: {t}" for k, t in notes]
        found += kuberay.name_problems(doc)
        if not found:
            spec = doc["spec"]
            if kind == "RayJob":
                cluster = spec.get("rayClusterSpec") or _selected_cluster(path, spec)
                found += kuberay.job_problems(spec, cluster)
                if spec.get("rayClusterSpec"):
                    found += kuberay.cluster_problems(spec["rayClusterSpec"], "spec.rayClusterSpec", ours)
                    images = [(f"spec.rayClusterSpec.{k}", v) for k, v in kuberay.images(spec["rayClusterSpec"])]
                else:
                    images = []
                submitter = ((spec.get("submitterPodTemplate") or {}).get("spec") or {}).get("containers") or []
                images += [("spec.submitterPodTemplate.spec.containers[0].image", submitter[0].get("image", ""))
                           ] if submitter else []
            else:
                found += kuberay.cluster_problems(spec, "spec", ours)
                images = [(f"spec.{k}", v) for k, v in kuberay.images(spec)]
            bad, notes = _image_problems(images, ours)
            found += bad
            warnings += [prefix + n for n in notes]
        problems += [(prefix + k, t) for k, t in found]
    return problems, warnings


def _selected_cluster(path: Path, job: dict) -> dict | None:
    """The spec of the RayCluster a RayJob's clusterSelector names, from the manifests beside the job's."""
    name = (job.get("clusterSelector") or {}).get("ray.io/cluster")
    for f in sorted(path.parent.glob("*.y*ml")):
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except (OSError, yaml.YAMLError):
            continue
        for d in docs:
            if isinstance(d, dict) and d.get("kind") == "RayCluster" and (d.get("metadata") or {}).get("name") == name:
                return d.get("spec") if isinstance(d.get("spec"), dict) else None
    return None


def read_cluster_file(path: str | Path) -> ClusterFile:
    """The file's documents, with warnings (placeholders, fields newer than KubeRay 1.1); ClusterFileError when it
    is not a cluster file, or when Ray or the operator would refuse it."""
    path = Path(path)
    docs = _load(path)
    ours = ray_version()
    launcher = [d for d in docs if isinstance(d, dict) and "available_node_types" in d]
    manifests = [d for d in docs if isinstance(d, dict) and d.get("kind") in KUBERAY_KINDS]
    if launcher:
        problems, warnings = _launcher_problems(launcher[0]), []
        if not problems:
            problems, warnings = _image_problems(_launcher_images(launcher[0]), ours)
    elif manifests:
        problems, warnings = _kuberay_check(path, manifests, ours)
    else:
        problems, warnings = [("", "neither a Ray cluster-launcher YAML (with available_node_types) nor a KubeRay "
                                   "RayCluster or RayJob manifest (kind:): give one of the files in cluster/ or "
                                   "your copy of one")], []
    if problems:
        raise ClusterFileError(path, problems)
    return ClusterFile(path, [d for d in docs if isinstance(d, dict)], warnings)


def cluster_gpus(path: str | Path) -> ClusterGPUs:
    """The GPU worker type of a Ray cluster-launcher YAML or a KubeRay RayCluster/RayJob manifest."""
    file = read_cluster_file(path)
    if file.launcher is not None:
        return _launcher_gpus(file.launcher, str(path))
    job = file.manifest("RayJob")
    if file.manifest("RayCluster") is None and job is not None and "rayClusterSpec" not in job["spec"]:
        name = (job["spec"].get("clusterSelector") or {}).get("ray.io/cluster")
        for f in sorted(Path(path).parent.glob("*.y*ml")):
            try:
                other = read_cluster_file(f)
            except ClusterFileError:
                continue
            cluster = other.manifest("RayCluster")
            if cluster is not None and (cluster.get("metadata") or {}).get("name") == name:
                return _kuberay_gpus(cluster["spec"], str(f))
        raise ClusterFileError(path, [("spec.clusterSelector", f"its RayCluster {name!r} is in no manifest beside "
                                                               "it: keep the RayCluster's file in the same folder")])
    cluster = file.manifest("RayCluster")
    return _kuberay_gpus(cluster["spec"] if cluster is not None else job["spec"]["rayClusterSpec"], str(path))


def _launcher_gpus(doc: dict, source: str) -> ClusterGPUs:
    best = None
    for name, spec in doc["available_node_types"].items():
        node_cfg = spec.get("node_config", {})
        node_type = node_cfg.get("InstanceType") or node_cfg.get("machineType") or ""
        try:
            gpu, per_node = gpu_of_node_type(node_type)
        except ValueError:
            continue
        per_node = int(spec.get("resources", {}).get("GPU", per_node))
        max_nodes = int(spec.get("max_workers", doc.get("max_workers", 0)))
        if name == doc.get("head_node_type"):
            max_nodes += 1
        if per_node and (best is None or per_node * max_nodes > best.gpus_per_node * best.max_nodes):
            best = ClusterGPUs(source, node_type, gpu, per_node, max_nodes)
    if best is None:
        raise ClusterFileError(source, [("available_node_types", "no node type with a known GPU instance or "
                                                                 "machine type (InstanceType, machineType)")])
    return best


def _kuberay_gpus(spec: dict, source: str) -> ClusterGPUs:
    for i, group in enumerate(spec.get("workerGroupSpecs") or []):
        pod = group["template"]["spec"]
        limits = pod["containers"][0].get("resources", {}).get("limits", {})
        per_node = int(limits.get(kuberay.GPU, 0))
        if not per_node:
            continue
        selector = pod.get("nodeSelector", {})
        node_type = (selector.get("node.kubernetes.io/instance-type")
                     or selector.get("cloud.google.com/gke-accelerator") or "")
        try:
            gpu, _ = gpu_of_node_type(node_type)
        except ValueError as e:
            raise ClusterFileError(source, [(f"spec.workerGroupSpecs[{i}].template.spec.nodeSelector", str(e))]
                                   ) from None
        return ClusterGPUs(source, node_type, gpu, per_node, int(group.get("maxReplicas", group.get("replicas", 1))))
    raise ClusterFileError(source, [("spec.workerGroupSpecs", f"no worker group requests {kuberay.GPU}")])
