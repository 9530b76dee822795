"""What the benchmarks share: the machine they ran on, medians, RESULTS.md sections, and running the real job.

`run_job` runs `python -m raytune_sd3.train`'s own path (`prepare_data` -> `build_trainer(...).fit()`) with one
addition inside each Ray Train worker: `timed_train_loop` wraps the project's `train_loop_per_worker` and records
when the calls a step makes (data read, `ray.train.report`) start and end, in wall and in thread CPU time, so a
benchmark can split a step's time; the loop itself runs unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from itertools import count, pairwise
from pathlib import Path

from profiler import StepProfile
from reference import ReferenceLoop

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny models are local; a hub lookup without network hangs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("RESULTS.md")
TINY_JOB = ROOT / "jobs" / "tiny.yaml"
LOAD_AT_START = os.getloadavg()[0]  # other work on the machine skews CPU figures: RESULTS.md says how much
BENCH_RECORD = "bench_rank{rank}.json"  # what timed_train_loop writes into output_dir, one per worker


# --- figures -------------------------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def time_calls(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call of `fn()` for `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def load_average() -> float:
    return os.getloadavg()[0]


def machine() -> dict:
    """The machine, versions and date a figure was measured on."""
    import diffusers
    import peft
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0].strip() if names else cpu
    info = {"date": datetime.date.today().isoformat(), "cpu": cpu, "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "peft": peft.__version__, "load_start": round(LOAD_AT_START, 1), "load_end": round(load_average(), 1)}
    with contextlib.suppress(ImportError):
        import ray

        info["ray"] = ray.__version__
    return info


def machine_line(info: dict) -> str:
    gpu = f"GPU {info['gpu']}" if info["gpu"] != "none" else "no GPU"
    versions = ", ".join(f"{k} {info[k]}" for k in ("python", "torch", "ray", "diffusers", "peft") if k in info)
    return (f"{info['date']}; {info['cores']}-core CPU ({info['cpu']}), {gpu}; {versions}; "
            f"1-min load average {info['load_start']} at the start, {info['load_end']} at the end")


def command(script: str, argv: list[str] | None) -> str:
    """The command line that produced a figure, for RESULTS.md."""
    args = sys.argv[1:] if argv is None else argv
    return "`" + " ".join([f"python benchmarks/{script}", *args]) + "`"


def table(header: list[str], rows: list[list]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- RESULTS.md ----------------------------------------------------------------------------------------------------

RESULTS_HEADER = """# Benchmark results

Written by the scripts in this folder (`python benchmarks/<name>.py`); each script replaces its own section and
leaves the others alone. Ratios are against a baseline measured in the same run; absolute CPU figures only tell
you that the script works.
"""


def write_section(title: str, body: str, path: Path = RESULTS) -> None:
    """Put `## title` + body into `path`, replacing that section if present (up to the next `## `), else appending."""
    text = path.read_text() if path.exists() else RESULTS_HEADER
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        text = text.rstrip() + "\n\n" + section
    path.write_text(text)


# --- the real job, timed from inside its workers ------------------------------------------------------------------


def bench_overrides(workdir: Path, overrides: list[str], job: Path = TINY_JOB) -> list[str]:
    """--set values that make `job` a benchmark run under `workdir`: no eval, no validation images, no LR warmup,
    one checkpoint at the last step (so the steps in between are plain training steps); then `overrides`."""
    from raytune_sd3.config import load_job

    base = [f"output_dir={workdir / 'run'}", f"data.cache_dir={workdir / 'cache'}",
            f"data.datasets.0.instance_data_dir={workdir / 'images'}", "data.eval_samples=0",
            "validation.prompts=[]", "train.lr_warmup_steps=0", "train.eval_every=null", *overrides]
    return [*base, f"train.checkpoint_every={load_job(job, base).train.max_steps}"]


def bench_job(workdir: Path, overrides: list[str], job: Path = TINY_JOB):
    """The JobConfig of `job` with bench_overrides, its `auto` settings resolved on the Ray this process is connected
    to (none yet: this machine's CPUs)."""
    from raytune_sd3.config import load_job
    from raytune_sd3.driver.placement import ensure_resolved

    cfg = load_job(job, bench_overrides(workdir, overrides, job))
    ensure_resolved(cfg)
    return cfg


# "FIRST,COUNT" in a worker's environment: rank 0 profiles optimizer steps FIRST .. FIRST+COUNT-1 (profiler.py)
PROFILE_ENV = "RAYTUNE_SD3_BENCH_PROFILE"


def timed_train_loop(config: dict, with_reference: bool = False) -> None:
    """The project's train_loop_per_worker, with its data reads, reports, model load and optimizer creation timed:
    each call's (start, end) in time.time() and in time.thread_time() (the training thread's CPU seconds), written
    to output_dir/bench_rank{R}.json. With several workers it then times a gloo all_reduce of the LoRA gradient's
    size (what DDP reduces every step).

    with_reference: also build reference.py's bare loop in this worker and run one of its steps at the start of
    each of ours (before our batch read), timed apart. Both then run on the same thread and core, moments apart:
    on a shared machine whose speed drifts by phases (see step.py) that pairs each of our steps with a reference
    step measured under the same conditions. Our figures have the reference's time taken out (JobRun)."""
    import ray.train
    import torch

    from raytune_sd3.train import loop

    record = {"entry": time.time(), "pid": os.getpid(), "threads": torch.get_num_threads(),
              "omp": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0), "load": [], "data": [], "report": [],
              "optimizer": [], "reference": [], "lora_numel": 0}

    def timed(name, fn):
        def call(*args, **kwargs):
            t0, c0 = time.time(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                record[name].append((t0, time.time(), c0, time.thread_time()))
        return call

    def count_lora(params, t):
        params = list(params)
        record["lora_numel"] = sum(p.numel() for p in params)
        return make_optimizer(params, t)

    reference = ReferenceLoop(config["job"], Path(config["manifest"]), config["pretrained"]) if with_reference else None
    grad_accum, reads = config["job"]["train"]["grad_accum"], count()
    timed_get, timed_reference = timed("data", loop.Prefetcher.get), timed("reference", lambda: reference.step())
    profile, (first, n_profiled) = None, (int(v) for v in os.environ.get(PROFILE_ENV, "0,0").split(","))
    if n_profiled and ray.train.get_context().get_world_rank() == 0:
        import ray.train.torch

        profile = StepProfile(ray.train.torch.get_device())

    def get(self):
        n = next(reads)
        if n % grad_accum == 0:  # optimizer step n // grad_accum + 1 starts
            if profile is not None and n // grad_accum + 1 == first:
                profile.start()
            elif profile is not None and n // grad_accum + 1 == first + n_profiled:
                record["profile"] = profile.stop(n_profiled)
            if reference is not None:  # once per optimizer step, at its start
                timed_reference()
        return timed_get(self)

    originals = (loop.load_transformer, loop.Prefetcher.get, ray.train.report, loop.make_optimizer)
    make_optimizer = loop.make_optimizer
    loop.load_transformer = timed("load", loop.load_transformer)
    loop.Prefetcher.get = get  # the step's wait for its batch (read ahead)
    ray.train.report = timed("report", ray.train.report)  # loop.py calls ray.train.report(...) at step time
    loop.make_optimizer = timed("optimizer", count_lora)
    try:
        loop.train_loop_per_worker(config)
    finally:
        loop.load_transformer, loop.Prefetcher.get, ray.train.report, loop.make_optimizer = originals
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world > 1:
        record["allreduce_s"] = _time_allreduce(record["lora_numel"])
    path = Path(config["job"]["output_dir"]) / BENCH_RECORD.format(rank=rank)
    path.write_text(json.dumps(record))


def timed_train_loop_with_reference(config: dict) -> None:
    timed_train_loop(config, with_reference=True)


def _time_allreduce(numel: int, repeats: int = 30) -> list[float]:
    import torch
    import torch.distributed as dist

    grad = torch.zeros(numel, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(grad)
        times.append(time.perf_counter() - t0)
    return times[5:]


@dataclass
class JobRun:
    """One fit of the job: rank 0's metrics.jsonl rows and each rank's timings from timed_train_loop."""

    metrics: list[dict]
    ranks: list[dict]
    fit_called: float  # time.time() when TorchTrainer.fit() was called
    fit_returned: float
    grad_accum: int = 1

    def _step_marks(self, clock: int) -> list[float]:
        """Each optimizer step's first data read, start time by `clock` (0: wall, 2: thread CPU), step 1 first."""
        return [call[clock] for call in self.ranks[0]["data"][:: self.grad_accum]]

    def _reference_within(self, a: float, b: float, clock: int) -> float:
        """Seconds (by `clock`) of the interleaved reference steps that started in [a, b)."""
        return sum(c[clock + 1] - c[clock] for c in self.ranks[0].get("reference", []) if a <= c[clock] < b)

    def periods(self, skip: int) -> list[float]:
        """Wall seconds from the start of step k to the start of step k+1 (everything: data, compute, logging,
        report; an interleaved reference step taken out), for k after the first `skip` steps."""
        return [b - a - self._reference_within(a, b, 0) for a, b in pairwise(self._step_marks(0))][skip:]

    def cpu_periods(self, skip: int) -> list[float]:
        """The training thread's CPU seconds from the start of step k to the start of step k+1, as periods()."""
        return [b - a - self._reference_within(a, b, 2) for a, b in pairwise(self._step_marks(2))][skip:]

    def reference(self, skip: int, cpu: bool = False) -> list[float]:
        """Seconds (wall, or the thread's CPU) of the interleaved reference step run at the start of step k, for
        the steps periods() covers: reference(skip)[i] ran next to periods(skip)[i]."""
        return self.durations("reference", skip, cpu)[1:]

    def in_step(self, skip: int) -> list[float]:
        """The loop's own step_time_s (metrics.jsonl), for the steps after the first `skip`, the last one excluded
        (less the interleaved reference step, which runs inside it)."""
        rows = [m for m in self.metrics if "step_time_s" in m]
        ref = self.durations("reference", 0) or [0.0] * len(rows)
        return [m["step_time_s"] - r for m, r in zip(rows, ref, strict=True)][skip:-1]

    def per_step(self, name: str, skip: int, cpu: bool = False) -> float:
        """Seconds per step spent in calls `name` on rank 0 over the steps periods() covers (a call that only some
        steps make, e.g. ray.train.report every report_every steps, is spread over all of them)."""
        marks = self._step_marks(0)[skip:]
        if len(marks) < 2:
            return float("nan")
        calls = [c for c in self.ranks[0][name] if marks[0] <= c[0] < marks[-1]]
        return sum(c[3] - c[2] if cpu else c[1] - c[0] for c in calls) / (len(marks) - 1)

    def startup(self) -> dict[str, float]:
        """Seconds of the fit's start on rank 0: workers start (fit() called to the train function's entry), model
        load (load_transformer: the frozen base read from its files), setup (the rest until the first batch read:
        quantisation, LoRA, the copy to the device, DDP, optimizer, reader) and first step (first read to first
        ray.train.report)."""
        w = self.ranks[0]
        load_start, load_end = w["load"][0][:2]
        first_read, first_report = w["data"][0][0], w["report"][0][0]
        return {"workers start": w["entry"] - self.fit_called, "model load": load_end - load_start,
                "setup": first_read - w["entry"] - (load_end - load_start), "first step": first_report - first_read}

    def durations(self, name: str, skip: int, cpu: bool = False) -> list[float]:
        """Seconds (wall, or the thread's CPU) of each timed call `name` on rank 0, after the first `skip`."""
        return [c[3] - c[2] if cpu else c[1] - c[0] for c in self.ranks[0].get(name, [])][skip:]


@contextlib.contextmanager
def _timed_loop_in_build_trainer(with_reference: bool):
    """Make build_trainer hand timed_train_loop to the TorchTrainer (it imports loop.train_loop_per_worker when
    called). Workers cannot import this folder, so Ray pickles this module and reference.py by value."""
    import ray.cloudpickle

    from raytune_sd3.train import loop

    for module in (sys.modules[__name__], sys.modules[ReferenceLoop.__module__], sys.modules[StepProfile.__module__]):
        ray.cloudpickle.register_pickle_by_value(module)
    original = loop.train_loop_per_worker
    loop.train_loop_per_worker = timed_train_loop_with_reference if with_reference else timed_train_loop
    try:
        yield
    finally:
        loop.train_loop_per_worker = original


def prepare(cfg) -> tuple[Path, str]:
    """Start (or join) Ray as the CLI does and fill the cache; returns (manifest, pretrained directory)."""
    from raytune_sd3.driver.caching import prepare_data
    from raytune_sd3.driver.runtime import init_ray
    from raytune_sd3.testmodels.resolve import resolve_pretrained

    pretrained = resolve_pretrained(cfg.model.pretrained)
    init_ray(cfg)
    manifest, _ = prepare_data(cfg, pretrained)
    return manifest, pretrained


def run_job(cfg, manifest: Path, pretrained: str, with_reference: bool = False) -> JobRun:
    """Fit the job's TorchTrainer (built by the CLI's build_trainer) with timed workers; output in cfg.output_dir.
    with_reference: interleave reference.py's steps with ours (timed_train_loop)."""
    from raytune_sd3.driver.training import build_trainer
    from raytune_sd3.run_layout import METRICS

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _timed_loop_in_build_trainer(with_reference):
        trainer = build_trainer(cfg, manifest, pretrained)
    t0 = time.time()
    result = trainer.fit()
    t1 = time.time()
    if result.error:
        raise RuntimeError(f"the benchmark's training run failed: {result.error}")
    metrics = [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line.strip()]
    ranks = [json.loads((out / BENCH_RECORD.format(rank=r)).read_text()) for r in range(cfg.train.num_workers)]
    return JobRun(metrics, ranks, t0, t1, cfg.train.grad_accum)
