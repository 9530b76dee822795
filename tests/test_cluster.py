"""The cluster files: Ray's own schema validation for the launcher YAMLs, the KubeRay manifests checked structurally
against the job they run, and a simulated two-node cluster on this machine running the tiny job via `ray job submit`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import ray
import tomllib
import yaml
from packaging.requirements import Requirement

from raytune_sd3.cluster_files import cluster_gpus, image_ray_version, read_cluster_file
from raytune_sd3.config import load_job
from raytune_sd3.hardware import NODE_TYPES

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
LAUNCHER = {"aws-h100.yaml": ("aws", "p5.48xlarge", "H100-80GB"), "aws-a100.yaml": ("aws", "p4d.24xlarge", "A100-40GB"),
            "gcp-h100.yaml": ("gcp", "a3-highgpu-8g", "H100-80GB"), "gcp-a100.yaml": ("gcp", "a2-highgpu-8g", "A100-40GB")}
SHARED = "/mnt/shared"
# What a leaked credential looks like: HF / AWS / GCP keys, private keys, a literal Ray token.
SECRET_PATTERNS = [r"hf_[A-Za-z0-9]{30,}", r"AKIA[0-9A-Z]{16}", r"-----BEGIN [A-Z ]*PRIVATE KEY", r"AIza[0-9A-Za-z_-]{35}",
                   r"\b[0-9a-f]{64}\b", r"aws_secret_access_key\s*[:=]"]


def ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(re.search(r"==([\d.]+)", d).group(1) for d in deps if d.startswith("ray["))


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def kube(kind: str) -> dict:
    for f in sorted(CLUSTER.glob("kuberay-*.yaml")):
        for doc in load(f.name):
            if doc.get("kind") == kind:
                return doc
    raise AssertionError(f"no {kind} manifest in cluster/")


def validate(config: dict) -> dict:
    """As Ray's test_autoscaler_yaml: fill the provider's defaults, then the JSON schema and Ray's own checks."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


# --- the launcher YAMLs -------------------------------------------------------------------------------------------


def test_every_cluster_file_is_known():
    assert set(LAUNCHER) | {"kuberay-raycluster.yaml", "kuberay-rayjob.yaml", "kuberay-shared-pvc.yaml"} == {
        f.name for f in CLUSTER.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_passes_rays_validation(name):
    prepared = validate(load(name)[0])
    provider, node_type, gpu = LAUNCHER[name]
    assert prepared["provider"]["type"] == provider
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}
    key = "InstanceType" if provider == "aws" else "machineType"
    assert [w["node_config"][key] for w in workers.values()] == [node_type, node_type]  # spot, on-demand
    assert NODE_TYPES[node_type][0] == gpu and cluster_gpus(CLUSTER / name).gpu == gpu


def test_validation_can_fail():
    broken = load("aws-h100.yaml")[0]
    broken["idle_timeout_minute"] = broken.pop("idle_timeout_minutes")  # a typo'd key
    with pytest.raises(Exception, match="idle_timeout_minute"):
        validate(broken)
    no_head = load("gcp-h100.yaml")[0]
    no_head["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate(no_head)


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_runs_this_project(name):
    c = load(name)[0]
    pin = ray_pin()
    assert pin == ray.__version__
    assert c["docker"]["image"] == image_of_the_dockerfile()  # Ray, torch and the project installed: starts ready
    # the repo goes to every node and is installed there over the image's copy, without reinstalling its dependencies
    assert c["file_mounts"]["~/raytune_sd3"] == "."
    assert "pip install -q --no-deps --no-build-isolation -e ~/raytune_sd3" in c["setup_commands"]  # no index
    assert ".gitignore" in c["rsync_filter"]
    # the token comes from the user's machine, the env in the container turns token auth on
    assert c["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "-e RAY_AUTH_MODE=token" in c["docker"]["run_options"]


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_spot_workers_beside_on_demand_ones_on_demand_head(name):
    """An on-demand head; a spot GPU type, which the autoscaler uses (max_workers), that turns its cloud's reclaim
    notice into Ray's drain notice; and the same GPUs on demand beside it (max_workers 0 until the user swaps)."""
    c = load(name)[0]
    cloud = c["provider"]["type"]
    head = c["available_node_types"][c["head_node_type"]]["node_config"]
    workers = {k: v for k, v in c["available_node_types"].items() if k != c["head_node_type"]}

    def spot(node: dict) -> bool:
        return (node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
                or node.get("scheduling", {}).get("provisioningModel") == "SPOT")

    spot_types = [k for k, v in workers.items() if spot(v["node_config"])]
    on_demand = [k for k, v in workers.items() if not spot(v["node_config"])]
    assert not spot(head) and len(spot_types) == len(on_demand) == 1
    assert workers[spot_types[0]]["max_workers"] == c["max_workers"] and workers[on_demand[0]]["max_workers"] == 0
    assert cluster_gpus(CLUSTER / name).max_nodes == c["max_workers"]  # the preflight reads the type in use
    assert workers[spot_types[0]]["worker_setup_commands"] == [
        f"nohup python -m raytune_sd3.spot {cloud} > /tmp/raytune_sd3-spot.log 2>&1 &"]
    assert "worker_setup_commands" not in workers[on_demand[0]]
    if cloud == "gcp":  # GPUs need TERMINATE on host maintenance
        assert all(w["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE" for w in workers.values())


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_shared_storage_in_one_place(name):
    c = load(name)[0]
    mounts = [cmd for cmd in c["initialization_commands"] if f" {SHARED}" in cmd and "mount " in cmd]
    assert len(mounts) == 1, "shared storage must be configured by exactly one command"
    assert mounts[0].count("SHARED=") == 1 and "CHANGE-ME" in mounts[0]  # a placeholder that fails loudly
    assert f"-v {SHARED}:{SHARED}" in c["docker"]["run_options"]
    assert f"-e HF_HOME={SHARED}/huggingface" in c["docker"]["run_options"]


def _ray_starts(commands: list[str]) -> list[dict[str, str]]:
    """The flags of each `ray start` in a list of shell commands (`--head` -> {"--head": ""})."""
    starts = []
    for cmd in commands:
        for part in re.split(r";|&&|\|\|", cmd):
            argv = shlex.split(part)
            if argv[:2] == ["ray", "start"]:
                starts.append(dict((a.split("=", 1) + [""])[:2] for a in argv[2:] if a.startswith("--")))
    return starts


def dashboard_exposure(c: dict) -> list[str]:
    """How a launcher file lets the dashboard (the job API, which runs any code it is sent) be reached from
    outside the cluster; [] when only the cluster's own nodes and an SSH tunnel (`ray dashboard`) reach it."""
    problems = []
    head, workers = _ray_starts(c["head_start_ray_commands"]), _ray_starts(c["worker_start_ray_commands"])
    if len(head) != 1 or "--head" not in head[0]:
        return [f"the head commands must run one `ray start --head`, got {head}"]
    host = head[0].get("--dashboard-host", "localhost")  # Ray's default binds loopback only
    if head[0].get("--dashboard-port", "8265") != "8265":
        problems.append("the dashboard moved off 8265, where `ray dashboard` tunnels to")
    if host not in ("localhost", "127.0.0.1"):  # bound on every interface: the network must keep it inside
        if c["provider"]["type"] == "aws" and c["provider"].get("security_group", {}).get("IpPermissions"):
            problems.append("inbound rules beyond Ray's (SSH from outside, all traffic between the cluster's nodes)")
        nets = [t["node_config"].get("networkInterfaces") for t in c["available_node_types"].values()]
        if c["provider"]["type"] == "gcp" and any(nets):
            problems.append("a network other than the default one, whose firewall admits only SSH from outside")
    for w in workers:
        if "--head" in w or "--dashboard-host" in w or w.get("--include-dashboard") == "true":
            problems.append(f"a worker node starts a head or a dashboard: {w}")
    if any(re.search(r"(^|\s)(-p|--publish)[\s=]", opt) or "8265" in opt for opt in c["docker"]["run_options"]):
        problems.append("docker publishes a port (the containers use the host's network)")
    return problems


@pytest.mark.parametrize("name", sorted(LAUNCHER))
def test_launcher_yaml_keeps_the_dashboard_inside(name):
    assert dashboard_exposure(load(name)[0]) == []


def test_dashboard_check_can_fail():
    aws, gcp = load("aws-h100.yaml")[0], load("gcp-h100.yaml")[0]
    opened = copy.deepcopy(aws)
    opened["provider"]["security_group"]["IpPermissions"] = [
        {"FromPort": 8265, "ToPort": 8265, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}]
    worker_dash = copy.deepcopy(gcp)
    worker_dash["worker_start_ray_commands"][-1] += " --dashboard-host=0.0.0.0"
    published = copy.deepcopy(aws)
    published["docker"]["run_options"].append("-p 8265:8265")
    other_net = copy.deepcopy(gcp)
    other_net["available_node_types"]["head"]["node_config"]["networkInterfaces"] = [{"network": "global/networks/open"}]
    for broken in (opened, worker_dash, published, other_net):
        assert len(dashboard_exposure(broken)) == 1, dashboard_exposure(broken)
    loopback = copy.deepcopy(opened)  # a dashboard on loopback only stays inside whatever the network admits
    loopback["head_start_ray_commands"] = [cmd.replace("--dashboard-host=0.0.0.0", "") for cmd in
                                           loopback["head_start_ray_commands"]]
    assert dashboard_exposure(loopback) == []


def test_jobs_use_the_shared_mount():
    cfg = load_job(ROOT / "jobs" / "sd35.yaml")
    for path in (cfg.output_dir, cfg.cache_dir, cfg.data.datasets[0].instance_data_dir):
        assert str(path).startswith(SHARED + "/"), path


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*")), ids=lambda p: p.name)
def test_no_secret_in_cluster_files(path):
    text = path.read_text()
    for pattern in SECRET_PATTERNS:
        assert not re.search(pattern, text), f"{path.name} looks like it holds a secret ({pattern})"


# --- KubeRay ------------------------------------------------------------------------------------------------------


def _pods(cluster: dict) -> list[dict]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_raycluster_structure():
    rc = kube("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == ray_pin()
    head, groups = rc["spec"]["headGroupSpec"], rc["spec"]["workerGroupSpecs"]
    assert head["template"]["spec"]["containers"] and groups
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress", False)
    for pod in _pods(rc):
        c = pod["containers"][0]
        assert c["image"] == image_of_the_dockerfile()
        env = {e["name"]: e for e in c["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        for secret in ("RAY_AUTH_TOKEN", "HF_TOKEN"):  # from a Kubernetes secret, never a literal
            assert "value" not in env[secret] and "secretKeyRef" in env[secret]["valueFrom"]
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
        assert claims[mounts[SHARED]] == kube("PersistentVolumeClaim")["metadata"]["name"]


def test_shared_volume_is_read_write_many():
    pvc = kube("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_an_existing_job_on_enough_gpus():
    job, rc = kube("RayJob"), kube("RayCluster")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
    entry = job["spec"]["entrypoint"]
    assert "python -m raytune_sd3.train" in entry
    job_file = re.search(r"python -m raytune_sd3\.train (\S+\.yaml)", entry).group(1)
    assert (ROOT / job_file).is_file(), job_file
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert "pip" not in runtime_env  # the image holds the project: nothing installed at job start
    assert entry.startswith(f"cd {dockerfile_workdir()} ")  # where the image put the project, jobs/ included
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == image_of_the_dockerfile()

    cfg = load_job(ROOT / job_file)
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
               for g in rc["spec"]["workerGroupSpecs"])
    assert gpus == cfg.train.num_workers * 1  # one GPU per Ray Train worker
    for g in rc["spec"]["workerGroupSpecs"]:
        res = g["template"]["spec"]["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_every_manifest_passes_the_operators_rules():
    """What KubeRay 1.1 to 1.7 would refuse or fail with (raytune_sd3/kuberay.py, written from the operator's
    validation.go and its CRDs): nothing, and no field newer than the oldest operator the files name."""
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        warnings = read_cluster_file(CLUSTER / name).warnings
        assert all("is a placeholder" in w for w in warnings), warnings


# --- the image ----------------------------------------------------------------------------------------------------


def dockerfile() -> list:
    import dockerfile as parser  # Docker's own (buildkit) parser

    return list(parser.parse_file(str(DOCKERFILE)))


def dockerfile_workdir() -> str:
    return next(c.value[0] for c in dockerfile() if c.cmd == "WORKDIR")


def image_of_the_dockerfile() -> str:
    """The image the cluster files run: the tag its header builds, in the registry placeholder the user sets once."""
    m = re.search(r"docker build -f docker/Dockerfile -t REGISTRY/(\S+) \.", DOCKERFILE.read_text())
    return f"REGISTRY-CHANGE-ME/{m.group(1)}"


def test_dockerfile_builds_on_our_ray_with_a_cuda_torch_and_the_project():
    commands = dockerfile()
    assert [c.value[0] for c in commands if c.cmd == "FROM"] == [f"rayproject/ray:{ray_pin()}-py311-gpu"]
    assert image_ray_version(image_of_the_dockerfile()) == ray_pin()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {Requirement(d).name: Requirement(d) for d in pyproject["dependencies"]}
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1] for c in commands if c.cmd == "ARG"}
    installs = [shlex.split(c.value[0]) for c in commands if c.cmd == "RUN" and c.value[0].startswith("pip install")]
    torch_line = next(argv for argv in installs if any(a.startswith("torch") for a in argv))
    torch = Requirement(next(a for a in torch_line if a.startswith("torch")))
    index = torch_line[torch_line.index("--index-url") + 1].replace("${TORCH_INDEX}", args["TORCH_INDEX"])
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index)  # a CUDA build, not PyPI's default
    (pinned,) = [s.version for s in torch.specifier if s.operator == "=="]
    assert pins["torch"].specifier.contains(pinned), (pinned, pins["torch"])  # the project's range keeps it
    project = next(argv for argv in installs if any(a.startswith(".[") for a in argv))
    extras = set(re.search(r"\.\[(.*)\]", next(a for a in project if a.startswith(".["))).group(1).split(","))
    assert extras and extras <= set(pyproject["optional-dependencies"]) and "dev" not in extras
    assert "lowvram" in extras  # the GPU extra: bitsandbytes
    # the build backend pyproject names, so the nodes' reinstall with --no-build-isolation needs no index
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(build == [a] for argv in installs for a in argv if a.startswith("setuptools")), build
    for c in commands:  # everything it copies exists, and the project's source is among it
        if c.cmd == "COPY":
            assert all((ROOT / src).exists() for src in c.value[:-1]), c.value
    copied = {src for c in commands if c.cmd == "COPY" for src in c.value[:-1]}
    assert {"pyproject.toml", "raytune_sd3", "jobs"} <= copied


def test_every_file_that_runs_the_image_names_the_same_tag():
    image = image_of_the_dockerfile()
    for name in LAUNCHER:
        assert load(name)[0]["docker"]["image"] == image
    rc, job = kube("RayCluster"), kube("RayJob")
    assert {c["image"] for pod in _pods(rc) for c in pod["containers"]} == {image}
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == image
    assert image in (CLUSTER / "README.md").read_text()


# --- a simulated two-node cluster ---------------------------------------------------------------------------------


STEPS, KILL_AFTER = 16, 6  # the second node is lost once step KILL_AFTER is logged, past the step-4 checkpoint


@pytest.mark.slow
def test_two_node_job_submit_survives_losing_a_node(tmp_path):
    """Two `ray start` nodes on this machine, with Ray's token auth; `ray job submit` of the tiny job with its cache
    and checkpoints on a path both use; the two training workers on different nodes (train.placement_strategy
    SPREAD). Mid-run the second node dies (every process of it killed at once, as a machine that loses power): Ray
    Train restarts the workers on the head from the last checkpoint and the job ends with every step, the LoRA and
    the validation images. (tests/ray_head.py: what starting the nodes took.)"""
    from tests.ray_head import (
        BIN,
        HEAD_START_S,
        MARKER,
        NO_AGENT,
        RAY,
        _free_ports,
        _kill_node,
        _our_pids,
        _stop_head,
        _wait_for_dashboard,
    )

    gcs, dash, client, agent_a, agent_b, env_agent, metrics_port = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rt2-", dir="/tmp")
    token = secrets.token_hex(32)
    shared = tmp_path / "shared"  # what /mnt/shared is on a real cluster: both nodes see it
    out, demo = shared / "out", shared / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HF_HUB_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", "RAYTUNE_SD3_HOME": str(shared / "home"),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": str(HEAD_START_S),
                "DASHBOARD_METRIC_PORT": str(metrics_port),
                "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    nodes = []  # (ray start process, its marker): each node's processes carry their own marker

    def start(args: list[str], log: Path) -> subprocess.Popen:
        marker = secrets.token_hex(8)
        with open(log, "wb") as f:
            p = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args],
                                 env={**env, MARKER: marker}, stdout=f, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        nodes.append((p, marker))
        return p

    try:
        head = start(["--head", f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                      f"--dashboard-agent-listen-port={agent_a}", f"--runtime-env-agent-port={env_agent}",
                      "--dashboard-host=127.0.0.1",
                      "--include-dashboard=true", "--num-cpus=3", f"--temp-dir={temp_dir}"], tmp_path / "head.log")
        _wait_for_dashboard(head, dash, token, tmp_path / "head.log")

        def ray_list(what: str, *filters: str) -> list[dict]:
            cmd = [RAY, "list", what, "--address", f"http://127.0.0.1:{dash}", "--format", "json", "--detail",
                   "--limit", "1000", "--timeout", "120", *[a for f in filters for a in ("--filter", f)]]
            for _ in range(10):  # on a loaded machine the state API fails or answers empty now and then
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
                if r.returncode == 0:
                    try:
                        return json.loads(r.stdout)
                    except json.JSONDecodeError:
                        pass
                time.sleep(3)
            logs = "".join(f"\n--- {p.name}\n{p.read_text(errors='replace')[-1500:]}"
                           for p in Path(temp_dir).glob("session_latest/logs/dashboard*.log"))
            raise AssertionError(f"ray list {what} failed 10 times: {r.stdout[-1500:]} {r.stderr[-1500:]}{logs}")

        # `ray start` gives a joining raylet a fixed 30 s to register; on a loaded 2-core machine it may miss that.
        for attempt in range(3):
            node2 = start([f"--address=127.0.0.1:{gcs}", "--num-cpus=3", f"--dashboard-agent-listen-port={agent_b}"],
                          tmp_path / f"node2-{attempt}.log")
            deadline = time.monotonic() + 120
            while (len(alive := ray_list("nodes", "state=ALIVE")) < 2 and node2.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(2)
            if len(alive) == 2:
                break
        assert len(alive) == 2, (tmp_path / f"node2-{attempt}.log").read_text()[-3000:]

        dataset = f"[{{id: shapes, type: demo, instance_data_dir: '{demo}', resolution: 64, demo_images: 12}}]"
        runtime_env = {"excludes": ["outputs", ".git", "*.safetensors", ".pytest_cache", ".ruff_cache"],
                       "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}}
        cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--runtime-env-json", json.dumps(runtime_env), "--log-color", "false", "--",
               "python", "-m", "raytune_sd3.train", "jobs/tiny.yaml",
               "--set", f"output_dir={out}", "--set", f"data.cache_dir={shared / 'cache'}",
               "--set", f"data.datasets={dataset}", "--set", "data.eval_samples=4", "--set", "data.encode_actors=1",
               # SPREAD: Ray puts the two workers on different nodes when it can (as on a GPU cluster)
               "--set", "train.num_workers=2", "--set", "train.placement_strategy=SPREAD",
               "--set", f"train.max_steps={STEPS}", "--set", "train.lr_warmup_steps=1",
               "--set", "train.checkpoint_every=4", "--set", "train.eval_every=8", "--set", "train.max_failures=3",
               "--set", "validation.steps=2"]
        metrics = out / "metrics.jsonl"
        t0, killed_at, before = time.monotonic(), None, []
        while True:
            with open(tmp_path / "submit.log", "w+") as log:
                job = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
                while job.poll() is None and time.monotonic() < t0 + 420:
                    lines = metrics.read_text().splitlines() if metrics.exists() else []
                    steps = [json.loads(x)["step"] for x in lines]
                    if killed_at is None and steps and max(steps) >= KILL_AFTER:
                        killed_at, before = max(steps), lines
                        _kill_node(node2, nodes[-1][1])
                    time.sleep(0.05)
                if job.poll() is None:
                    job.kill()
                    tail = (tmp_path / "submit.log").read_text()[-6000:]
                    pytest.fail(f"ray job submit did not finish in 420s:\n{tail}")
                output = (tmp_path / "submit.log").read_text()
            # Refused, with nothing submitted, while the head's dashboard agent has not registered yet.
            if job.returncode == 0 or NO_AGENT not in output or time.monotonic() > t0 + HEAD_START_S:
                break
            time.sleep(2)
        print(f"\ntwo nodes up; job finished in {time.monotonic() - t0:.0f}s with {job.returncode}")
        assert job.returncode == 0 and "succeeded" in output.lower(), output[-6000:]
        assert killed_at is not None and killed_at < STEPS, f"the job ended before a node could be lost: {killed_at}"

        assert (out / "pytorch_lora_weights.safetensors").is_file()
        logged = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        # every step once: the restarted workers resumed from the checkpoint and the log kept no repeated steps
        assert [r["step"] for r in logged if "loss" in r] == list(range(1, STEPS + 1))
        # Resumed, not retrained: step k+1 starts only once the step-k checkpoint is on storage, so the newest one
        # before the kill is at or after `saved`, and the lines up to it (step times included) are those written
        # before the kill. A retrain from step 0 (or from an older checkpoint) would rewrite them.
        saved = (killed_at - 1) // 4 * 4  # checkpoint_every=4
        kept = [x for x in metrics.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= saved]
        assert saved >= 4 and kept == [x for x in before if json.loads(x)["step"] <= saved], (killed_at, before)
        assert any((out / "ray").rglob("checkpoint_*")), "checkpoints on the shared path"
        assert len(list((out / "validation").glob("step_*/*.png"))) == 2  # the 2 prompts of jobs/tiny.yaml
        workers = ray_list("actors", "class_name=RayTrainWorker")
        # the first two on both nodes; after the loss, a new pair (the head can hold both)
        assert len({a["node_id"] for a in workers}) == 2 and len(workers) >= 4, [
            (a["node_id"], a["state"]) for a in workers]
    finally:
        swept = [_stop_head(p, marker) for p, marker in reversed(nodes)]
        print(f"nodes stopped; swept after killpg: {swept}")
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not any(_our_pids(marker, p.pid) for p, marker in nodes), "processes of the test's Ray nodes survived"
