"""Fitting a job to the Ray cluster it runs on, on the driver, before any model loads.

- `auto` settings become values read off the cluster: one worker per GPU (or 2 CPU workers), bf16 weights and
  autocast on GPUs, fp32 on CPUs, the largest micro-batch that fits the GPU (driver/microbatch.py)
  (`resolve_auto`; job.yaml records the result).
- A worker count the cluster can never place stops the job in seconds, naming what it needs, what the cluster has
  and the `--set` that fits (`check_placement`), unless an autoscaler may add nodes: then the job waits and says
  every 30 s what for (`WaitReporter`). Ray Train itself would wait without a word, forever.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass

from raytune_sd3.config import ConfigError, JobConfig, check_global_batch, quantised_base_problem
from raytune_sd3.driver.console import BackgroundLoop
from raytune_sd3.hardware import card_of_ray_accelerator

log = logging.getLogger(__name__)
CPU_WORKERS = 2  # `auto` on a cluster without GPUs: enough to exercise DDP, little enough for a laptop
GPU_ATTENTION = ("flash", "cudnn", "efficient")  # train.attention kernels torch has on CUDA only


class PlacementError(ConfigError):
    """The cluster can never run the job as configured; the message says what fits."""


@dataclass(frozen=True)
class Cluster:
    """What a Ray cluster offers a job: each alive node's total resources, and whether it may grow."""

    nodes: tuple[dict[str, float], ...]
    autoscaling: bool = False
    card: tuple[str, float] | None = None
    """(name, GiB) of the workers' GPU where known from elsewhere (the check's --gpu or cluster file); otherwise
    `gpu_card` reads it from the GPU nodes' `accelerator_type:<label>` resources."""
    machine: str = ""
    """For a local Ray: what the machine under its logical CPUs really has (cores, memory), said beside them."""

    def gpu_card(self) -> tuple[str, float] | str:
        """(what to call it, GiB) of the smallest GPU a worker may land on, or why it is not known."""
        if self.card:
            return self.card
        known, unknown = [], set()
        for node in self.nodes:
            if node.get("GPU", 0) <= 0:
                continue  # a CPU head (`ray job submit` from a machine without a GPU) trains nothing
            labels = [k.split(":", 1)[1] for k in node if k.startswith("accelerator_type:")]
            cards = [(c[1], c, label) for label in labels if (c := card_of_ray_accelerator(label))]
            if cards:  # "A100" beside a hand-added "A100-80G": the more specific (larger) one
                known.append(max(cards))
            else:
                unknown.update(labels or ["(none)"])
        if unknown:
            return (f"Ray names the GPU {'/'.join(sorted(unknown))}, whose memory is not in raytune_sd3/hardware.py"
                    if unknown != {"(none)"} else "the GPU nodes carry no accelerator_type resource")
        if not known:
            return "the cluster has no GPU node up yet"
        gib, (name, _, smallest_of_several), label = min(known)
        return (f"{name}, the smallest card Ray's {label} may be" if smallest_of_several else name), gib

    @property
    def gpus(self) -> int:
        return int(sum(n.get("GPU", 0) for n in self.nodes))

    @property
    def cpus(self) -> float:
        return sum(n.get("CPU", 0) for n in self.nodes)

    def describe(self) -> str:
        gpus = f"{self.gpus} GPU{'s' * (self.gpus != 1)}, " if self.gpus else "no GPU, "
        where = self.machine or f"{len(self.nodes)} node{'s' * (len(self.nodes) != 1)}"
        return f"{gpus}{self.cpus:g} CPUs on {where}"


def local_machine(cfg: JobConfig) -> Cluster:
    """The cluster a local Ray started by this job would be, read off this machine without starting it: its GPUs
    (as Ray counts them: NVIDIA's driver, CUDA_VISIBLE_DEVICES), the logical CPUs init_ray gives it, and the real
    cores and memory beside them."""
    # private, as Ray exposes them to no public API: the GPUs, cores and memory as ray.init would count them
    # (driver, CUDA_VISIBLE_DEVICES, container limits), read before Ray starts
    from ray._private.accelerators import NvidiaGPUAcceleratorManager as Nvidia
    from ray._private.utils import get_num_cpus, get_system_memory

    from raytune_sd3.driver.runtime import local_num_cpus

    node: dict[str, float] = {"CPU": float(local_num_cpus(cfg))}
    gpus = Nvidia.get_current_node_num_accelerators()
    visible = Nvidia.get_current_process_visible_accelerator_ids()
    if visible is not None:
        gpus = min(gpus, len(visible))
    if gpus:
        node["GPU"] = float(gpus)
        if label := Nvidia.get_current_node_accelerator_type():
            node[f"accelerator_type:{label}"] = 1.0
    cores = get_num_cpus()
    machine = f"this machine ({cores} core{'s' * (cores != 1)}, {get_system_memory() / 2**30:.0f} GiB of memory)"
    return Cluster((node,), machine=machine)


def read_cluster(cfg: JobConfig) -> Cluster:
    """The cluster this process's Ray is connected to (ray.init first)."""
    import ray

    from raytune_sd3.driver import runtime

    nodes = tuple(dict(n["Resources"]) for n in ray.nodes() if n.get("Alive"))
    autoscaling = cfg.ray.autoscaling if cfg.ray.autoscaling is not None else has_autoscaler()
    machine = local_machine(cfg).machine if runtime.started_locally and len(nodes) == 1 else ""
    return Cluster(nodes, autoscaling, machine=machine)


def has_autoscaler() -> bool:
    """Whether an autoscaler that can add nodes runs for this cluster.

    Ray's monitor also runs on a local Ray and on a cluster started by hand, with a read-only view that gives every
    node a type of its own ("node_<id>"); a real autoscaler (cluster launcher, KubeRay) reports the node types of
    its config. Autoscaler v2 is only switched on by those. No status yet (a Ray that just started): none.
    """
    # private: the autoscaler's status is published only in Ray's internal KV store (what `ray status` reads)
    from ray.experimental.internal_kv import _internal_kv_get

    try:
        if _internal_kv_get("__autoscaler_v2_enabled") in (b"1", b"true", b"True"):
            return True
        raw = _internal_kv_get("__autoscaling_status")
        report = (json.loads(raw) if raw else {}).get("autoscaler_report") or {}
    except Exception:  # noqa: BLE001 - an unreadable status is not a reason to stop the job
        return False
    types = (report.get("node_type_mapping") or {}).items()
    return any(t != f"node_{node_id}" for node_id, t in types)


def uses_gpu(cfg: JobConfig, cluster: Cluster) -> bool:
    return cfg.train.use_gpu if cfg.train.use_gpu is not None else cluster.gpus > 0


def resolve_auto(cfg: JobConfig, cluster: Cluster) -> list[str]:
    """Replace every `auto` of the job by its value on `cluster` (in place); returns one line per choice made.

    Idempotent: a resolved job (a job.yaml written by an earlier run) passes through unchanged.
    """
    notes = []
    t, m = cfg.train, cfg.model
    gpu = uses_gpu(cfg, cluster)
    if t.use_gpu is None:
        t.use_gpu = gpu  # the trainer must not decide again on a cluster that changed in between
    if not t.use_gpu and t.attention in GPU_ATTENTION:
        raise ConfigError(f"train.attention {t.attention} is a GPU kernel and this job trains on CPUs "
                          f"({cluster.describe()}): use train.attention: auto (or math)")
    if t.num_workers == "auto":
        if gpu and not cluster.gpus:
            raise PlacementError(
                f"train.num_workers auto: train.use_gpu is true but this Ray cluster has no GPU yet "
                f"({cluster.describe()}); give a number (--set train.num_workers=8), which an autoscaling cluster "
                "starts GPU nodes for")
        t.num_workers = cluster.gpus if gpu else CPU_WORKERS
        notes.append(f"train.num_workers auto -> {t.num_workers} ("
                     + (f"one per GPU of {cluster.describe()})" if gpu else "CPU workers: the cluster has no GPU)"))
    if m.dtype == "auto":
        m.dtype = "bf16" if gpu else "fp32"
        notes.append(f"model.dtype auto -> {m.dtype}")
    if t.mixed_precision == "auto":
        t.mixed_precision = "bf16" if gpu else "no"
        notes.append(f"train.mixed_precision auto -> {t.mixed_precision}")
    if m.text_encoder_dtype == "auto":  # the caching stage's encoders use the cluster's GPUs whoever trains
        m.text_encoder_dtype = "bf16" if cluster.gpus else "fp32"
        notes.append(f"model.text_encoder_dtype auto -> {m.text_encoder_dtype}")
    if (problem := quantised_base_problem(m.quantize, m.dtype, t.strategy, t.mixed_precision)) is not None:
        chosen = [n for n in notes if n.startswith(("model.dtype", "train.mixed_precision"))]
        raise ConfigError(problem + (f" ({'; '.join(chosen)})" if chosen else ""))
    try:  # the worker count is known only now
        check_global_batch(t)
    except ValueError as e:
        raise ConfigError(f"{e} (train.num_workers resolved to {t.num_workers} on {cluster.describe()})") from None
    if t.batch_size == "auto":  # last: the estimate needs the workers, dtype and precision chosen above
        from raytune_sd3.driver.microbatch import resolve_micro_batch

        notes.append(resolve_micro_batch(cfg, cluster.gpu_card() if t.use_gpu else None))
    return notes


def resolve_as_saved(cfg: JobConfig, saved: JobConfig) -> None:
    """Give every `auto` of the job the value an earlier run of it resolved (its job.yaml): for commands that
    work on that run's results without Ray, such as a study's --report-only."""
    t, m = cfg.train, cfg.model
    for section, saved_section, name in ((t, saved.train, "num_workers"), (t, saved.train, "mixed_precision"),
                                         (m, saved.model, "dtype"), (m, saved.model, "text_encoder_dtype")):
        if getattr(section, name) == "auto":
            setattr(section, name, getattr(saved_section, name))
    if t.batch_size == "auto":  # grad_accum was chosen with it
        t.batch_size, t.grad_accum = saved.train.batch_size, saved.train.grad_accum
    if t.use_gpu is None:
        t.use_gpu = saved.train.use_gpu


def worker_bundle(cfg: JobConfig) -> dict[str, float]:
    """The resources one Ray Train worker reserves."""
    bundle = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        bundle["GPU"] = 1.0
    return bundle


def placeable(bundle: dict[str, float], nodes: tuple[dict[str, float], ...], strategy: str = "PACK") -> int:
    """How many `bundle`s the nodes' totals can hold at once (STRICT_SPREAD: at most one per node)."""
    per_node = [min((math.floor(n.get(r, 0) / need + 1e-9) for r, need in bundle.items() if need > 0),
                    default=0) for n in nodes]
    if strategy == "STRICT_SPREAD":
        return sum(1 for k in per_node if k >= 1)
    return sum(per_node)


def check_placement(cfg: JobConfig, cluster: Cluster) -> None:
    """Raise PlacementError when the workers can never be placed on `cluster` and no autoscaler may add nodes."""
    t = cfg.train
    bundle = worker_bundle(cfg)
    need = t.min_workers  # elastic: Ray Train starts with whatever fits between min and max
    fits = placeable(bundle, cluster.nodes, t.placement_strategy)
    if fits >= need:
        return
    what = ", ".join(f"{k}: {v:g}" for k, v in bundle.items())
    asked = f"train.num_workers {t.num_workers}" + (f" ({t.placement_strategy})" if t.placement_strategy != "PACK" else "")
    if cluster.autoscaling:
        log.warning("%s needs %d x {%s}; the cluster has %s now. Waiting for the autoscaler to add nodes.",
                    asked, need, what, cluster.describe())
        return
    if fits:
        fix = (f"--set train.num_workers={fits}" + (" (or auto)" if "GPU" in bundle else "")
               if not t.elastic else f"--set train.num_workers=[1,{t.max_workers}]")
    elif "GPU" in bundle:
        fix = "a cluster with GPUs, or --set train.use_gpu=false to train on CPUs"
    else:
        fix = f"--set train.cpus_per_worker={max(n.get('CPU', 0) for n in cluster.nodes) or 1:g}"
    raise PlacementError(
        f"{asked} needs {need} x {{{what}}}, but this Ray cluster has {cluster.describe()}, which fits {fits} "
        f"(and has no autoscaler to add nodes). Use {fix}. (On a cluster that does autoscale, set "
        "ray.autoscaling: true to wait for it instead.)")


class WaitReporter(BackgroundLoop):
    """While Ray Train (or Tune) waits for resources, say every `interval` s what for; a context manager.

    Waiting shows as a placement group in PENDING state (Ray Train reserves its workers through one).
    """

    def __init__(self, cfg: JobConfig, interval: float = 30.0):
        super().__init__(min(interval, 5.0), "raytune_sd3-wait-reporter")
        self.cfg, self.interval = cfg, interval
        self._since = self._last = None

    def tick(self, final: bool = False) -> None:
        if final:
            return
        pending = pending_bundles()
        now = time.monotonic()
        if not pending:
            self._since = self._last = None
            return
        self._since = self._since or now
        if now - self._since < self.interval or (self._last and now - self._last < self.interval):
            return
        self._last = now
        what = ", ".join(f"{k}: {v:g}" for k, v in sorted(pending[0].items()))
        hope = ("the autoscaler may add nodes (`ray status` shows its progress)" if read_cluster(self.cfg).autoscaling
                else "nothing will free them: stop the job and lower train.num_workers")
        log.warning("waiting %.0f s for resources: %d x {%s} not placed yet; free on the cluster: %s; %s",
                    now - self._since, len(pending), what, free_resources(), hope)


def pending_bundles() -> list[dict[str, float]]:
    """The resource bundles of every placement group still waiting to be placed."""
    import ray.util

    bundles = []
    for pg in ray.util.placement_group_table().values():
        if pg.get("state") in ("PENDING", "RESCHEDULING"):
            bundles += [{k: v for k, v in b.items() if k in ("CPU", "GPU")} for b in pg.get("bundles", {}).values()]
    return bundles


def free_resources() -> str:
    import ray

    free = ray.available_resources()
    return ", ".join(f"{k} {free.get(k, 0):g}" for k in ("GPU", "CPU") if k in ray.cluster_resources()) or "nothing"


def fit_to_cluster(cfg: JobConfig) -> Cluster:
    """resolve_auto then check_placement against the cluster Ray is connected to; logs each `auto` choice."""
    cluster = read_cluster(cfg)
    notes = resolve_auto(cfg, cluster)
    if notes:
        log.info("on %s: %s", cluster.describe(), "; ".join(notes))
    check_placement(cfg, cluster)
    return cluster


def ensure_resolved(cfg: JobConfig) -> None:
    """resolve_auto against the connected cluster (no Ray: a CPU machine) if the job still holds an `auto`: for
    library callers that skip fit_to_cluster, such as tests calling prepare_data directly."""
    import ray

    t, m = cfg.train, cfg.model
    if "auto" in (t.num_workers, t.batch_size, t.mixed_precision, m.dtype, m.text_encoder_dtype) or t.use_gpu is None:
        resolve_auto(cfg, read_cluster(cfg) if ray.is_initialized() else Cluster(()))
