"""The preflight's checks (what `python -m raytune_sd3.check` prints), and the refusals train and tune run
before Ray starts (refuse_early) and after joining a cluster (refuse_on_cluster): model, data and batches,
storage, workers against the cluster, per-GPU memory. Each check adds lines to a Report; none exits.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from raytune_sd3.cluster_files import cluster_gpus, read_cluster_file
from raytune_sd3.config import (
    TINY_MODELS,
    ConfigError,
    JobConfig,
    quantised_base_problem,
    shorten,
)
from raytune_sd3.data.buckets import sizings_of
from raytune_sd3.driver.microbatch import TIGHT, job_estimator
from raytune_sd3.driver.placement import Cluster, PlacementError, check_placement, local_machine, resolve_auto
from raytune_sd3.driver.preflight import check_paths, checking_stores
from raytune_sd3.hardware import GIB, GPU_GIB, gpu_memory
from raytune_sd3.memory import STRATEGIES
from raytune_sd3.models.catalogue import TransformerShape, transformer_config


@dataclass
class Report:
    """What the preflight found: lines to print and whether anything must be fixed."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def ok(self, topic: str, text: str) -> None:
        self.lines.append(f"[ok]   {topic:<8} {text}")

    def warn(self, topic: str, text: str) -> None:
        self.lines.append(f"[warn] {topic:<8} {text}")

    def fail(self, topic: str, text: str) -> None:
        self.lines.append(f"[FAIL] {topic:<8} {text}")
        self.problems.append(f"{topic}: {text}")

    def block(self, text: str) -> None:
        self.lines.append(text)


# --- the checks ---------------------------------------------------------------------------------------------------


def check_model(cfg: JobConfig, report: Report) -> str | None:
    """Whether the model can be loaded from here; returns a local folder (or hub id) for its config, or None."""
    pretrained = cfg.model.pretrained
    if pretrained in TINY_MODELS:
        # imported here for start-up time: testmodels.resolve loads torch
        from raytune_sd3.testmodels.resolve import resolve_pretrained

        folder = resolve_pretrained(pretrained)
        report.ok("model", f"{pretrained}: built offline ({folder})")
        return folder
    local = Path(pretrained).expanduser()
    if local.is_dir():
        missing = [f for f in ("model_index.json", "transformer/config.json", "vae/config.json")
                   if not (local / f).is_file()]
        if missing:
            report.fail("model", f"{local}: not a diffusers SD3 folder (missing {', '.join(missing)})")
            return None
        report.ok("model", f"{local}: a diffusers folder")
        return str(local)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(pretrained, "model_index.json", revision=cfg.model.revision)
    except Exception:  # not a valid repo id
        cached = None
    if isinstance(cached, str):
        report.ok("model", f"{pretrained}: in the local HF cache ({Path(cached).parents[2]})")
        return pretrained
    hint = ("download it on a machine that sees the cache: `hf download " + pretrained + "` with HF_TOKEN set in "
            "the environment (the SD3 models are gated: accept the licence on the hub first)")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        report.fail("model", f"{pretrained}: not in the local HF cache and HF_HUB_OFFLINE=1; {hint}")
    else:
        report.warn("model", f"{pretrained}: not in the local HF cache here; every node would download it; {hint}")
    return pretrained


def check_data(cfg: JobConfig, report: Report) -> int:
    """Counts the images of each data set and their aspect buckets (from the image headers), and checks that what
    the eval hold-out leaves fills a global batch in every bucket (once the worker count is known); returns the
    total."""
    with checking_stores():
        total, rows = _count_images(cfg, report)
    if rows:
        check_batches(cfg, rows, report)
    return total


def _count_images(cfg: JobConfig, report: Report) -> tuple[int, list[dict]]:
    """check_data's count: the images of each data set and their bucket rows."""
    from raytune_sd3.data.discovery import discover

    total, rows = 0, []
    for i, ds in enumerate(cfg.data.datasets):
        if ds.type == "demo":
            if ds.instance_data_dir.is_dir() and any(ds.instance_data_dir.iterdir()):
                items = discover(ds, cfg.data.bucket_alignment)[0]
                rows += _bucket_rows(items)
                report.ok("data", f"{ds.id}: {len(items)} images in {ds.instance_data_dir}, {_buckets(rows, ds.id)}")
                total += len(items)
            else:
                from raytune_sd3.data.buckets import size_for_aspect

                w, h = size_for_aspect(1.0, sizings_of(ds, cfg.data.bucket_alignment)[-1])
                report.ok("data", f"{ds.id}: demo, {ds.demo_images} square images generated on first use, "
                                  f"1 bucket {w}x{h}")
                rows += [{"width": w, "height": h, "dataset_id": ds.id, "repeats": 0}] * ds.demo_images
                total += ds.demo_images
            continue
        if ds.in_store or ds.type in ("parquet", "huggingface", "webdataset"):
            count, found = _check_store(ds, cfg.data.bucket_alignment, report)
            rows += found
            total += count
            continue
        if not ds.instance_data_dir.is_dir():
            report.fail("data", f"data.datasets[{i}] ({ds.id}): {ds.instance_data_dir} is not reachable from here")
            continue
        try:
            items = discover(ds, cfg.data.bucket_alignment)[0]
        except ValueError as e:
            report.fail("data", str(e))
            continue
        rows += _bucket_rows(items)
        captions = sum(1 for it in {it.path for it in items} if Path(it).with_suffix(".txt").is_file())
        cap = f", {captions} with a .txt caption" if ds.caption_strategy == "textfile" else ""
        report.ok("data", f"{ds.id}: {len(items)} images{cap}, {_buckets(rows, ds.id)}")
        total += len(items)
    return total, rows


def _check_store(ds, alignment: int, report: Report) -> tuple[int, list[dict]]:
    """A data set in a store, a table or tar shards: its images counted from the listing, the rows or the tar
    headers, their buckets from each image's first bytes (one ranged read; a table's width and height columns where
    it has them). Returns the count and the bucket rows of the images that can be read."""
    from raytune_sd3.data.discovery import discover
    from raytune_sd3.data.files import redacted
    from raytune_sd3.data.sizes import sizes_of, table_sizes
    from raytune_sd3.data.sources import sources_of
    from raytune_sd3.data.tables import table_sources
    from raytune_sd3.data.webdataset import shard_sources

    try:
        items = discover(ds, alignment)[0]
        sources = {**sources_of([str(ds.instance_data_dir)] if ds.in_store else []), **table_sources([ds]),
                   **shard_sources([ds])}
        known = table_sizes(ds) if ds.type in ("parquet", "huggingface") else {}
    except (ValueError, OSError) as e:
        report.fail("data", f"{ds.id}: {str(e)[:300]}")
        return 0, []
    paths = sorted({it.path for it in items})
    sizes = dict(zip(paths, sizes_of(paths, sources, known), strict=True))
    rows = _bucket_rows(items, sizes)
    where = redacted(str(ds.instance_data_dir or ds.path or ds.dataset or ", ".join(ds.urls_list)))
    unreadable = sum(1 for v in sizes.values() if v is None)
    bad = f", {unreadable} unreadable (skipped when caching)" if unreadable else ""
    report.ok("data", f"{ds.id}: {len(paths)} images in {where}{bad}, {_buckets(rows, ds.id)}")
    return len(paths), rows


def check_batches(cfg: JobConfig, rows: list[dict], report: Report) -> None:
    """The eval hold-out first, then the buckets of what is left, as training sees them (driver/caching.py). Which
    images are held out depends on their content hashes, which only caching computes: a failure that every
    hold-out causes is a FAIL, one that some would cause a warning."""
    # imported here for start-up time: data.reader loads torch
    from raytune_sd3.data.reader import BucketError, plan_buckets

    held, policy = cfg.data.eval_samples, cfg.data.small_buckets
    if held >= len(rows):
        report.fail("data", f"data.eval_samples {held}: holds out all {len(rows)} images for the eval loss and "
                            f"leaves none to train on; lower it (--set data.eval_samples={max(len(rows) // 5, 0)})")
        return
    if cfg.train.num_workers == "auto":  # on a cluster not joined yet: train checks this once it has joined
        report.ok("data", f"data.eval_samples {held} of {len(rows)} images held out; batches checked once "
                          "train.num_workers auto is resolved")
        return
    batch = cfg.train.global_batch
    try:
        _, notes = plan_buckets(_hold_out(rows, held, spare=True), batch, policy)
    except BucketError as e:
        report.fail("data", f"{e}" + (f" (after data.eval_samples {held} held out)" if held else ""))
        return
    for line in notes:
        report.warn("data", f"data.small_buckets {policy}: {line}")
    at_risk = []
    for size in {(r["width"], r["height"]) for r in rows}:
        try:
            plan_buckets(_hold_out(rows, held, spare=False, bucket=size), batch, policy)
        except BucketError:
            at_risk.append(f"{size[0]}x{size[1]}")
    if at_risk:
        report.warn("data", f"bucket(s) {', '.join(sorted(at_risk))}: if the eval hold-out (data.eval_samples "
                            f"{held}, chosen by content hash while caching) takes its images from there, what is "
                            f"left cannot fill a global batch of {batch} and training stops; add images of that "
                            "shape, lower data.eval_samples, or set data.small_buckets: oversubscribe")


def _hold_out(rows: list[dict], n: int, spare: bool, bucket: tuple[int, int] | None = None) -> list[dict]:
    """`rows` less `n` of them: spread over the buckets with the most samples to spare (`spare`, the kindest
    hold-out), or all from `bucket` first (the harshest for it)."""
    by_bucket: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        by_bucket.setdefault((r["width"], r["height"]), []).append(r)
    for members in by_bucket.values():
        members.sort(key=lambda r: r["repeats"])
    for _ in range(n):
        if spare:
            size = max(by_bucket, key=lambda b: sum(1 + r["repeats"] for r in by_bucket[b]))
        else:
            size = bucket if by_bucket.get(bucket) else max(by_bucket, key=lambda b: len(by_bucket[b]))
        by_bucket[size].pop(0 if spare else -1)
        if not by_bucket[size]:
            del by_bucket[size]
    return [r for members in by_bucket.values() for r in members]


def _bucket_rows(items: list, sizes: dict[str, tuple[int, int] | None] | None = None) -> list[dict]:
    """Each item's bucket from its header, or from `sizes` {path: (width, height) or None} where given
    (unreadable images are left out, as caching would skip them)."""
    from raytune_sd3.data.buckets import Sizing, plan
    from raytune_sd3.data.pixels import image_size

    rows = []
    for it in items:
        try:
            size = sizes[it.path] if sizes is not None else image_size(it.path)
            if size is None:
                continue
            w, h = plan(*size, Sizing.from_json(it.sizing), 0).size
        except Exception:  # noqa: BLE001 - the cache stage reports why
            continue
        rows.append({"width": w, "height": h, "dataset_id": it.dataset_id, "repeats": it.repeats})
    return rows


def _buckets(rows: list[dict], dataset_id: str) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        if r["dataset_id"] == dataset_id:
            counts[f"{r['width']}x{r['height']}"] = counts.get(f"{r['width']}x{r['height']}", 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])
    shown = ", ".join(f"{name} ({n})" for name, n in top[:6]) + (f", ... {len(top) - 6} more" if len(top) > 6 else "")
    return f"{len(counts)} bucket(s): {shown}"


STORAGE_PROBE_S = 10.0  # a remote cache that has not answered by then is reported, not waited for


def probe_storage(location: str, timeout_s: float = STORAGE_PROBE_S) -> str | None:
    """Write, read back and delete a small object at `location` (a URI) as the encoders and the reader will; None
    when that worked, else why not. Gives up after `timeout_s`: GCS's client is told to stop retrying by then, and
    any client still waiting (an endpoint that drops packets) is left behind in a daemon thread."""
    from raytune_sd3.data.files import CacheFiles

    outcome: dict[str, BaseException | None] = {}

    def probe() -> None:
        try:
            files = CacheFiles(location, retry_limit_s=timeout_s / 4)  # each of its calls may use it up
            path = files.join(".raytune_sd3-write-probe")
            files.size(path)  # one call first: an unreachable store fails here, within one retry limit
            files.write(path, b"ok")
            if files.read(path) != b"ok":
                raise OSError("the probe object read back differs from what was written")
            files.delete(path)
            outcome["error"] = None
        except Exception as e:  # noqa: BLE001 - any failure is the answer
            outcome["error"] = e

    thread = threading.Thread(target=probe, name="storage-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        return f"no answer within {timeout_s:.0f} s (the endpoint or network does not respond; its client retries)"
    error = outcome["error"]
    if error is None:
        return None
    reason = " ".join(str(error).split())
    return f"{type(error).__name__}: {shorten(reason, 240)}" if reason else type(error).__name__


# Filesystems every node of a cluster can mount as the same files (fuse.*: gcsfuse, s3fs, mountpoint-s3, blobfuse2,
# juicefs; AWS EFS and GCP Filestore are nfs4/nfs, FSx for Lustre is lustre).
SHARED_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "ceph", "glusterfs", "gpfs", "beegfs",
                      "wekafs", "fuse")


def mount_of(path: Path) -> tuple[str, str] | None:
    """(mount point, filesystem type) holding `path`, or its nearest existing parent; None where the mount table
    cannot be read (not Linux)."""
    try:
        lines = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    mounts = {}
    for line in lines:
        fields = line.split()
        if len(fields) >= 3:  # octal escapes in mount points: a space is \040
            mounts[fields[1].encode().decode("unicode_escape")] = fields[2]
    existing = next((a for a in [path, *path.parents] if a.exists()), Path("/"))
    for folder in [existing.resolve(), *existing.resolve().parents]:
        if str(folder) in mounts:
            return str(folder), mounts[str(folder)]
    return None


def shared_storage_problem(key: str, path: Path, where: str) -> str | None:
    """Why a local `path` is not storage that every node of `where` (a cluster) sees, or None."""
    mount = mount_of(path)
    if mount is None or mount[1].split(".")[0] in SHARED_FILESYSTEMS:
        return None
    point, fstype = mount
    missing = "" if path.exists() else f"does not exist yet, and would be made on {point}: "
    # The fix first: a line longer than one_screen's width is cut at its end.
    return (f"{key}: {path} {missing}is on {fstype} at {point}, this machine's own disk, which the other nodes of "
            f"{where} do not see: use a URI (s3://bucket/path or gs://bucket/path) or a folder every node mounts "
            "(nfs, lustre, ceph, gpfs, cifs or a fuse mount such as gcsfuse or s3fs)")


def working_dir_problem(key: str, path: Path) -> str | None:
    """Under `ray job submit --working-dir`, a relative path resolves into Ray's temporary copy of that folder,
    which the user never sees again (and other nodes have their own copy of)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw or "working_dir" not in raw:
        return None
    cwd = Path.cwd()
    if path != cwd and cwd not in path.parents:
        return None
    return (f"{key}: {path} is inside Ray's temporary copy of the --working-dir of `ray job submit` (a relative "
            "path resolves there): nobody sees it after the job. Give an absolute path on storage every node "
            f"mounts, e.g. --set {key}=/mnt/shared/raytune_sd3/NAME, or a URI (s3://bucket/path, gs://bucket/path)")


def check_storage(cfg: JobConfig, report: Report, shared_by: str | None = None) -> None:
    """output_dir and the cache must be writable from here; on a cluster (`shared_by`: its description), storage
    every node mounts."""
    from raytune_sd3.data.files import is_uri, redacted

    for key, path in (("output_dir", cfg.output_dir), ("data.cache_dir", cfg.cache_dir)):
        if is_uri(str(path)):
            problem = probe_storage(str(path))
            if problem is None:
                report.ok("storage", f"{key}: {redacted(str(path))} (written and read back)")
            else:
                report.fail("storage", f"{key}: cannot write to {redacted(str(path))} from here: {problem} (check "
                                       "the bucket, the endpoint in the URI's query, and the credentials in the "
                                       "environment)")
            continue
        p = Path(path)
        existing = next((a for a in [p, *p.parents] if a.exists()), None)
        if (problem := working_dir_problem(key, p)) is not None:
            report.fail("storage", problem)
        elif existing is None or not os.access(existing, os.W_OK):
            report.fail("storage", f"{key}: {p} is not writable from here (nearest existing folder: {existing})")
        elif shared_by and (problem := shared_storage_problem(key, p, shared_by)) is not None:
            report.fail("storage", problem)
        else:
            mount = mount_of(p) if shared_by else None
            report.ok("storage", f"{key}: {p}" + (f" ({mount[1]} at {mount[0]}, shared)" if mount else ""))


def check_memory(cfg: JobConfig, report: Report, gpu_bytes: float | None, gpu_name: str, strategy: str,
                 quantization: str | None, config_dir: str | None) -> None:
    try:
        config, source = transformer_config(config_dir or cfg.model.pretrained, cfg.model.revision)
    except ValueError as e:
        report.fail("memory", str(e))
        return
    shape = TransformerShape.from_config(config)
    t, ds0 = cfg.train, max(cfg.data.datasets, key=lambda d: d.max_resolution)
    estimator = job_estimator(cfg, config, config_dir or cfg.model.pretrained, strategy, quantization or "none")
    refused = quantised_base_problem(quantization or cfg.model.quantize, cfg.model.dtype, strategy or t.strategy,
                                     t.mixed_precision)
    if refused is not None:  # only a what-if can get here: the job itself was validated
        report.warn("memory", f"estimated, but the trainer refuses it: {refused}")

    def at(batch: int = t.batch_size, **what_if):
        return estimator(batch, **what_if)

    est = at()
    report.block(f"         estimate from {source}: {shape.num_layers} blocks x width {shape.width}, "
                 f"{strategy}, {t.max_workers} worker(s), {ds0.max_resolution}px, T5 {cfg.text.t5_max_length}"
                 + (f", {quantization}" if quantization else "")
                 + (", gradient checkpointing" if t.gradient_checkpointing else ""))
    report.block(est.table(gpu_bytes))
    for note in est.notes:
        report.warn("memory", note)
    if (ss := cfg.flow.scheduled_sampling) is not None:  # time, not memory: its forwards keep no activations
        report.ok("rollout", f"flow.scheduled_sampling: up to {ss.max_step_offset} extra forward passes (no gradient) "
                             "per micro-batch; no extra memory")
    if not gpu_bytes:
        report.ok("memory", f"{est.total / GIB:.1f} GiB per GPU (no --cluster or --gpu given to compare with)")
        return
    if est.total <= TIGHT * gpu_bytes:
        report.ok("memory", f"fits: {est.total / GIB:.1f} of {gpu_bytes / GIB:.1f} GiB on {gpu_name}")
        return
    if est.total <= gpu_bytes:
        report.warn("memory", f"fits, but tight: {est.total / GIB:.1f} of {gpu_bytes / GIB:.1f} GiB on {gpu_name} "
                              f"(above {TIGHT:.0%}; the estimate's error could tip it)")
        return
    over = (est.total - gpu_bytes) / GIB
    fixes = []
    per_worker = t.batch_size * t.grad_accum  # images per worker per step: only divisors keep it
    for b in range(t.batch_size - 1, 0, -1):
        if per_worker % b == 0 and at(batch=b).total <= TIGHT * gpu_bytes:
            fixes.append(f"--set train.batch_size={b} --set train.grad_accum={per_worker // b} (same images per step)")
            break
    if not t.gradient_checkpointing and at(ckpt=True).total <= TIGHT * gpu_bytes:
        fixes.append("--set train.gradient_checkpointing=true")
    for strat in ("zero2", "zero3"):
        if STRATEGIES.index(strat) <= STRATEGIES.index(strategy):
            continue
        if not _door_allows(cfg, strategy=strat):  # e.g. EMA, DoRA, LyCORIS, a rollout or Prodigy under ZeRO-3
            continue
        if at(strat=strat).total <= TIGHT * gpu_bytes:
            fixes.append(f"--set train.strategy={strat}")
            break
    for quant in ("int8", "int4"):
        if not quantization and at(quant=quant).total <= TIGHT * gpu_bytes:
            fixes.append(f"--set model.quantize={quant}")
            break
    bigger = sorted((g for g, gib in GPU_GIB.items() if est.total <= TIGHT * gib * GIB), key=GPU_GIB.get)
    if bigger:
        fixes.append(f"a GPU with more memory: {bigger[0]}")
    report.fail("memory", f"does not fit: {est.total / GIB:.1f} GiB per GPU, {over:.1f} GiB over {gpu_name}'s "
                          f"{gpu_bytes / GIB:.1f} GiB. Change one of: " + "; ".join(fixes or ["the model size"]))


def _door_allows(cfg: JobConfig, **train: object) -> bool:
    """Whether the job with these train settings passes the schema's own rules: a fix offered must not be one the
    door then refuses."""
    dumped = cfg.model_dump()
    try:
        JobConfig.model_validate({**dumped, "train": {**dumped["train"], **train}})
    except ValueError:  # pydantic's ValidationError is one
        return False
    return True


def target_cluster(cfg: JobConfig, cluster: str | None, gpu: str | None, here: bool = True) -> Cluster:
    """The cluster a job's `auto` settings are resolved against here: the cluster file's GPU nodes at their
    maximum count, one GPU (--gpu), or, with neither, this machine as a local Ray would see it (`here`), else (a
    check away from the machine it will run on, --skip-paths) one GPU for a real model and a CPU machine for a tiny
    one."""
    if cluster:
        try:
            c = cluster_gpus(cluster)
            return Cluster(({"GPU": c.gpus_per_node, "CPU": 8.0 * c.gpus_per_node},) * c.max_nodes, autoscaling=True,
                           card=(c.gpu, GPU_GIB[c.gpu]))
        except (OSError, ValueError, KeyError):
            pass  # run_checks reports the unreadable file
    if gpu:
        return Cluster(({"GPU": 1, "CPU": 8.0},), card=gpu_memory(gpu))
    if here:
        return local_machine(cfg)
    if cfg.model.pretrained not in TINY_MODELS:  # a GPU of unknown memory: train.batch_size auto says so
        return Cluster(({"GPU": 1, "CPU": 8.0},), machine="an assumed machine with 1 GPU (give --gpu or --cluster)")
    return Cluster(({"CPU": 8.0},), machine="an assumed CPU machine (give --gpu or --cluster)")


def check_workers(cfg: JobConfig, target: Cluster, gpu: str | None, report: Report) -> None:
    """The worker count against one card (--gpu) or this machine (no --cluster: that has its own check)."""
    t = cfg.train
    if gpu:
        if t.use_gpu and t.max_workers > 1:
            report.fail("workers", f"train.num_workers {t.num_workers} needs {t.max_workers} GPUs, and --gpu checks "
                                   "against one card: --set train.num_workers=1 (or auto), or check against the "
                                   "cluster it will run on with --cluster FILE")
        return
    try:
        check_placement(cfg, target)
    except PlacementError as e:
        report.fail("workers", f"{e} (checked against {target.machine}; to check against the machine it will run "
                               "on, give --gpu CARD or --cluster FILE, or run the check there)")


def run_checks(cfg: JobConfig, *, cluster: str | None = None, gpu: str | None = None, strategy: str | None = None,
               quantization: str | None = None, skip_paths: bool = False) -> Report:
    report = Report()
    t = cfg.train
    target = target_cluster(cfg, cluster, gpu, here=not skip_paths)
    if target.machine:
        report.ok("target", f"no --gpu or --cluster: checked against {target.describe()}")
    try:
        notes = resolve_auto(cfg, target)
    except ConfigError as e:
        report.fail("auto", str(e))
        return report
    for note in notes:
        report.ok("auto", note)
    report.ok("config", f"{cfg.model.pretrained} ({cfg.model.dtype}), {t.max_workers} workers x batch "
                        f"{t.batch_size} x accum {t.grad_accum}, LoRA rank {cfg.lora.rank} on {cfg.lora.targets}, "
                        f"T5 {cfg.text.t5_max_length} tokens, mixed precision {t.mixed_precision}")
    if not cluster and not (skip_paths and not gpu):
        check_workers(cfg, target, gpu, report)
    strategy = strategy or t.strategy
    if not quantization and cfg.model.quantize != "none":
        quantization = cfg.model.quantize
    config_dir = None
    if not skip_paths:
        try:
            check_paths(cfg, cuda=target.gpus > 0)  # the GPU it is checked against, not this machine's
        except ConfigError as e:
            for line in str(e).splitlines()[1:]:
                report.fail("paths", line.strip())
        config_dir = check_model(cfg, report)
        check_storage(cfg, report, shared_by=f"the cluster of {cluster}" if cluster else None)
        check_data(cfg, report)
    elif cfg.model.pretrained in TINY_MODELS:
        # imported here for start-up time: testmodels.resolve loads torch
        from raytune_sd3.testmodels.resolve import resolve_pretrained

        config_dir = resolve_pretrained(cfg.model.pretrained)
    gpu_bytes, gpu_name = None, ""
    if cluster:
        try:
            for note in read_cluster_file(cluster).warnings:
                report.warn("cluster", note)
            c = cluster_gpus(cluster)
        except (OSError, ValueError, KeyError) as e:
            report.fail("cluster", str(e))
        else:
            gpu_bytes, gpu_name = c.gpu_bytes, f"{c.node_type} ({c.gpus_per_node}x {c.gpu})"
            capacity = c.gpus_per_node * c.max_nodes
            if t.max_workers > capacity:
                report.fail("cluster", f"{t.max_workers} workers need {t.max_workers} GPUs; {c.source} has at most "
                                       f"{capacity} ({c.max_nodes} x {c.node_type})")
            else:
                nodes = -(-t.max_workers // c.gpus_per_node)
                report.ok("cluster", f"{c.source}: {t.max_workers} workers on {nodes} x {gpu_name} "
                                     f"(up to {c.max_nodes} nodes)")
    elif gpu:
        gpu_name, gib = gpu_memory(gpu)
        gpu_bytes = gib * GIB
    elif target.machine and target.gpus and isinstance(card := target.gpu_card(), tuple):
        (gpu_name, gib), gpu_bytes = card, card[1] * GIB  # this machine's own GPU, as Ray names it
    check_memory(cfg, report, gpu_bytes, gpu_name, strategy, quantization, config_dir)
    return report


def starts_local_ray(cfg: JobConfig) -> bool:
    """Whether the job trains on this machine: no cluster to join (ray.address, RAY_ADDRESS, a `ray job submit`)."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))


def refuse_early(cfg: JobConfig) -> None:
    """The checks of this command that train and tune run before Ray starts (after check_paths): the model, the
    storage, the data and its batches, and on a local Ray the workers against this machine. Raises ConfigError
    with the check's own lines. On a cluster not joined yet, what needs its worker count waits for refuse_batches.
    Works on a copy: `auto` is resolved for real once Ray is up."""
    job, report = cfg.model_copy(deep=True), Report()
    check_model(job, report)
    check_storage(job, report)
    if starts_local_ray(job):
        target = local_machine(job)
        try:
            resolve_auto(job, target)
            check_placement(job, target)
        except ConfigError as e:
            report.fail("workers" if isinstance(e, PlacementError) else "auto", str(e))
    if not report.problems:  # the data last: its headers are the slow part on a large set
        check_data(job, report)
    _raise(report)


def refuse_on_cluster(cfg: JobConfig, cluster: Cluster) -> None:
    """After joining a cluster (`auto` resolved on it), what refuse_early could not know: the eval hold-out and the
    buckets against the global batch, and, where the job's nodes are more than one machine (or an autoscaler may
    add some), storage that every node sees."""
    if starts_local_ray(cfg):
        return  # refuse_early checked this machine
    import ray

    report = Report()
    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    if len(hosts) > 1 or cluster.autoscaling:  # nodes on one host (a test cluster) share its disk
        where = f"this Ray cluster ({cluster.describe()}" + (", autoscaling)" if cluster.autoscaling else ")")
        shared = [("output_dir", cfg.output_dir), ("data.cache_dir", cfg.cache_dir)]
        if cfg.lora.init_from is not None:  # every worker reads it
            shared.append(("lora.init_from", cfg.lora.init_from.parent))
        for key, path in shared:
            if "://" not in str(path) and (problem := shared_storage_problem(key, Path(path), where)):
                report.fail("storage", problem)
    check_data(cfg, report)
    _raise(report)


def _raise(report: Report) -> None:
    if report.problems:
        raise ConfigError("the preflight (python -m raytune_sd3.check) finds what would stop this job:\n"
                          + "\n".join(line for line in report.lines if line.startswith("[FAIL]")))
