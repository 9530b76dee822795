"""What the KubeRay operator (1.1 to 1.7) would refuse in a RayCluster / RayJob manifest, or accept and then fail
with, found before `kubectl apply`: field names and types of its CRDs (kuberay_fields.py), the rules of its
validation that touch the fields we use, and the Ray version the cluster runs.

The operator rules are written from reading github.com/ray-project/kuberay, ray-operator/controllers/ray/utils/
validation.go (ValidateRayClusterSpec, ValidateRayJobSpec, validateDeletionConfiguration) and common/pod.go (which
containers get the auth token). Each problem is (key, what is wrong and the fix).
"""

from __future__ import annotations

import re

import yaml

from raytune_sd3.kuberay_fields import FIELDS

OLDEST, NEWEST = "1.1", "1.7"  # the operator versions whose CRDs and rules these checks hold to
TEMPLATES = ("template", "submitterPodTemplate")  # pod templates: core Kubernetes, only partly in FIELDS
GPU = "nvidia.com/gpu"
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # utils/constant.go: MaxRayClusterNameLength, MaxRayJobNameLength

Problem = tuple[str, str]
PYTHON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "boolean": "true or false",
         "integer": "a whole number", "number": "a number", "int-or-string": "a whole number or a string"}


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.split("."))


def _is(value, kind: str) -> bool:
    if kind == "int-or-string":
        return isinstance(value, (int, str)) and not isinstance(value, bool)
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, PYTHON_TYPES[kind])


def yaml_type_name(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", int: "a number",
            float: "a number", type(None): "empty"}.get(type(value), type(value).__name__)


def _quote_hint(value, kind: str) -> str:
    """A number where the CRD wants a string (rayStartParams: num-cpus: 0) or a fraction where it wants an int or a
    string (a quantity such as 0.5): quoting it is the fix the CRD accepts."""
    if (kind == "string" and isinstance(value, (int, float, bool))) or (kind == "int-or-string" and isinstance(value, float)):
        return f' (quote it: "{value}")'
    return ""


def schema_problems(doc: dict) -> tuple[list[Problem], list[Problem]]:
    """(problems, warnings) of a manifest's spec against the CRD fields: wrong types, unknown fields where the CRD
    lists every field, and fields that need a newer operator than 1.1 (warnings)."""
    kind = doc["kind"]
    problems: list[Problem] = []
    warnings: list[Problem] = []

    def walk(value, table: dict, path: str, key: str, in_template: bool, outer: str = OLDEST) -> None:
        entry = table.get(path)
        if entry is None:
            return
        kind_, since, until = entry
        if kind_.startswith("map of "):
            inner = kind_.removeprefix("map of ")
            if not isinstance(value, dict):
                problems.append((key, f"must be a mapping of names to {WORDS[inner].split(' ', 1)[1]}s, not "
                                      f"{yaml_type_name(value)}"))
                return
            for k, v in value.items():
                if not _is(v, inner):
                    problems.append((f"{key}.{k}", f"must be {WORDS[inner]}, not {yaml_type_name(v)}{_quote_hint(v, inner)}"))
            return
        if not _is(value, kind_):
            problems.append((key, f"must be {WORDS[kind_]}, not {yaml_type_name(value)}{_quote_hint(value, kind_)}"))
            return
        if _version_key(since) > _version_key(outer):  # once, at the outermost field that needs it
            warnings.append((key, f"needs KubeRay operator >= {since} (older operators drop the field)"))
        if until:
            warnings.append((key, f"only KubeRay operator {since} to {until} knows this field"))
        if isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, table, path + "[]", f"{key}[{i}]", in_template, max(since, outer, key=_version_key))
        elif isinstance(value, dict):
            closed = not in_template and path.count(".") <= 1  # FIELDS lists every child of these
            for k, v in value.items():
                child = f"{path}.{k}"
                if child not in table and closed:
                    problems.append((f"{key}.{k}", f"not a field of a {kind} in KubeRay {OLDEST} to {NEWEST} (its "
                                                   "CRD would drop or refuse it): check the spelling"))
                    continue
                walk(v, table, child, f"{key}.{k}", in_template or k in TEMPLATES, max(since, outer, key=_version_key))

    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return [("spec", f"must be a mapping (the {kind}'s settings), not {yaml_type_name(spec)}")], []
    walk(spec, FIELDS[kind], "spec", "spec", False)
    inner = spec.get("rayClusterSpec")
    if kind == "RayJob" and inner is not None:
        if not isinstance(inner, dict):
            problems.append(("spec.rayClusterSpec", f"must be a mapping, not {yaml_type_name(inner)}"))
        else:
            walk(inner, FIELDS["RayCluster"], "spec", "spec.rayClusterSpec", False)
    return problems, warnings


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or [] if isinstance(e, dict)}


def _groups(spec: dict) -> list[tuple[str, dict]]:
    """(key, group) of the head group and every worker group."""
    return [("headGroupSpec", spec.get("headGroupSpec") or {})] + [
        (f"workerGroupSpecs[{i}]", g) for i, g in enumerate(spec.get("workerGroupSpecs") or [])]


def _containers(group: dict) -> list[dict]:
    return ((group.get("template") or {}).get("spec") or {}).get("containers") or []


def cluster_problems(spec: dict, at: str, ray_version: str) -> list[Problem]:
    """A RayCluster spec (`at`: its key, spec or spec.rayClusterSpec) against ValidateRayClusterSpec and what makes an
    accepted cluster fail: the autoscaler without the token, fractional GPUs, another Ray."""
    problems: list[Problem] = []
    for key, group in _groups(spec):
        if not _containers(group):
            problems.append((f"{at}.{key}.template.spec.containers", "needs at least one container (the Ray one "
                                                                     "first)"))
            continue
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append((f"{at}.{key}.resources", "set in both rayStartParams and resources: keep one"))
        if "labels" in params:
            problems.append((f"{at}.{key}.rayStartParams.labels", f"not supported: use {at}.{key}.labels"))
        ray = _containers(group)[0]
        limits = (ray.get("resources") or {}).get("limits") or {}
        requests = (ray.get("resources") or {}).get("requests") or {}
        for where, amounts in (("limits", limits), ("requests", requests)):
            gpus = amounts.get(GPU)
            if gpus is not None and not re.fullmatch(r"[0-9]+", str(gpus)):
                problems.append((f"{at}.{key}.template.spec.containers[0].resources.{where}.{GPU}",
                                 f"{gpus!r}: GPUs are whole devices in Kubernetes: a whole number such as 1"))
        if GPU in limits and GPU in requests and str(limits[GPU]) != str(requests[GPU]):
            problems.append((f"{at}.{key}.template.spec.containers[0].resources", f"requests and limits of {GPU} "
                                                                                "differ: Kubernetes needs them equal"))
        if "num-gpus" in params and GPU in limits and str(params["num-gpus"]) != str(limits[GPU]):
            problems.append((f"{at}.{key}.rayStartParams.num-gpus", f"{params['num-gpus']} but the pod has "
                                                                   f"{limits[GPU]} {GPU}: drop num-gpus (Ray reads "
                                                                   "the limit)"))
        if spec.get("enableInTreeAutoscaling") and group.get("suspend"):
            problems.append((f"{at}.{key}.suspend", "a worker group cannot be suspended with the autoscaler on"))
    rv = spec.get("rayVersion")
    if rv is not None and str(rv) != ray_version:
        problems.append((f"{at}.rayVersion", f"{rv}, but this project runs Ray {ray_version}: set rayVersion: "
                                             f'"{ray_version}" (and the images of the same Ray)'))
    auth = spec.get("authOptions") or {}
    token_by_operator = isinstance(auth, dict) and auth.get("mode", "token" if auth else None) == "token"
    if token_by_operator and rv is not None and _version_key(str(rv)) < (2, 52):  # validation.go: IsAuthEnabled
        problems.append((f"{at}.authOptions", f"token auth needs Ray >= 2.52 (rayVersion {rv})"))
    head = _containers(spec.get("headGroupSpec") or {})
    token_in_pods = bool(head) and (_env(head[0]).get("RAY_AUTH_MODE") or {}).get("value") == "token"
    if spec.get("enableInTreeAutoscaling") and token_in_pods and not token_by_operator:
        # pod.go: the injected autoscaler sidecar gets the token only from authOptions, or autoscalerOptions.env.
        env = _env(spec.get("autoscalerOptions") or {})
        missing = [n for n in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN") if n not in env]
        if missing:
            problems.append((f"{at}.autoscalerOptions.env", f"lacks {' and '.join(missing)}: the Ray pods use token "
                                                            "auth, and the autoscaler sidecar gets no token from "
                                                            "them, so it never scales up. Add the same "
                                                            "RAY_AUTH_MODE and RAY_AUTH_TOKEN entries as the Ray "
                                                            "containers (KubeRay >= 1.6: or authOptions: {mode: "
                                                            "token, secretName: ...})"))
    return problems


def job_problems(job: dict, cluster: dict | None) -> list[Problem]:
    """A RayJob spec against ValidateRayJobSpec and validateDeletionConfiguration; `cluster` is the spec it runs on
    (its rayClusterSpec, or the RayCluster its clusterSelector names), when known."""
    problems: list[Problem] = []
    ttl = job.get("ttlSecondsAfterFinished", 0) or 0
    selector = job.get("clusterSelector") or {}
    if ttl < 0:
        problems.append(("spec.ttlSecondsAfterFinished", "must not be negative"))
    if ttl > 0 and not job.get("shutdownAfterJobFinishes"):
        fix = ("remove it: a job that targets an existing cluster (clusterSelector) deletes nothing" if selector else
               "add shutdownAfterJobFinishes: true, or remove it")
        problems.append(("spec.ttlSecondsAfterFinished", f"set without shutdownAfterJobFinishes: true, which KubeRay "
                                                         f">= 1.4 refuses (the job never runs): {fix}"))
    if job.get("suspend") and not job.get("shutdownAfterJobFinishes"):
        problems.append(("spec.suspend", "a job with shutdownAfterJobFinishes false cannot be suspended"))
    if job.get("suspend") and selector:
        problems.append(("spec.suspend", "a job with a clusterSelector cannot be suspended"))
    if not job.get("rayClusterSpec") and not selector:
        problems.append(("spec", "needs rayClusterSpec or clusterSelector (which cluster runs the job)"))
    if selector and not selector.get("ray.io/cluster"):
        problems.append(("spec.clusterSelector", "needs ray.io/cluster: the name of the RayCluster"))
    if selector and job.get("submissionMode") == "SidecarMode":
        problems.append(("spec.submissionMode", "SidecarMode does not work with a clusterSelector"))
    for i, rule in enumerate(((job.get("deletionStrategy") or {}).get("deletionRules") or []) if selector else []):
        if isinstance(rule, dict) and rule.get("policy") in ("DeleteCluster", "DeleteWorkers"):
            problems.append((f"spec.deletionStrategy.deletionRules[{i}].policy",
                             f"{rule['policy']} cannot apply to a cluster the job did not create (clusterSelector)"))
    if job.get("activeDeadlineSeconds") is not None and job["activeDeadlineSeconds"] <= 0:
        problems.append(("spec.activeDeadlineSeconds", "must be a positive number of seconds"))
    if job.get("backoffLimit", 0) < 0:
        problems.append(("spec.backoffLimit", "must not be negative"))
    try:
        env = yaml.safe_load(job.get("runtimeEnvYAML") or "{}")
        if env is not None and not isinstance(env, dict):
            raise ValueError
    except (yaml.YAMLError, ValueError):
        problems.append(("spec.runtimeEnvYAML", "is not a YAML mapping (pip:, env_vars:, ...): the operator refuses "
                                                "the job"))
    head = (cluster or {}).get("headGroupSpec") or {}
    if str((head.get("rayStartParams") or {}).get("num-cpus", "")) == "0":
        asks = [k for k in ("entrypointNumCpus", "entrypointNumGpus", "entrypointResources") if job.get(k)]
        if asks:
            problems.append((f"spec.{asks[0]}", "the head has num-cpus 0, so a driver that asks for resources is "
                                                "never placed on it (and waits for a GPU pod, or forever): remove "
                                                f"{', '.join(asks)}"))
    return problems


def images(spec: dict) -> list[tuple[str, str]]:
    """(key, image) of the Ray containers of a RayCluster spec."""
    return [(f"{key}.template.spec.containers[0].image", _containers(g)[0].get("image", ""))
            for key, g in _groups(spec) if _containers(g)]


def name_problems(doc: dict) -> list[Problem]:
    name = str((doc.get("metadata") or {}).get("name", ""))
    if not DNS_1035.fullmatch(name) or len(name) > MAX_NAME[doc["kind"]]:
        return [("metadata.name", f"{name!r}: lowercase letters, digits and '-', starting with a letter, at most "
                                  f"{MAX_NAME[doc['kind']]} characters")]
    return []
