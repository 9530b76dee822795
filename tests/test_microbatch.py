"""train.batch_size auto: the largest micro-batch that fits the workers' GPU, keeping train.global_batch_size.

The expected micro-batch is computed here from memory.estimate() itself (not from the module's helper), on Cluster
objects whose GPU nodes carry Ray's `accelerator_type:<label>` resource as Ray 2.60 puts it there."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytune_sd3.config import ConfigError, dump_job, load_job
from raytune_sd3.driver.placement import Cluster, resolve_as_saved, resolve_auto
from raytune_sd3.driver.resume import guard_resume
from raytune_sd3.hardware import GIB, GPU_GIB
from raytune_sd3.memory import estimate
from raytune_sd3.models.catalogue import KNOWN_TRANSFORMERS, SD3_VAE_PARAMS, TransformerShape
from raytune_sd3.run_layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]
LARGE = "stabilityai/stable-diffusion-3.5-large"


def gpu_node(label: str | None, gpus: int = 1) -> dict[str, float]:
    node = {"CPU": 16.0 * gpus, "GPU": float(gpus), "memory": 1e11}
    if label:
        node[f"accelerator_type:{label}"] = 1.0
    return node


CPU_HEAD = {"CPU": 8.0, "memory": 3e10}  # `ray job submit` from a head without a GPU
ONE_H100 = Cluster((gpu_node("H100"),))
EIGHT_H100 = Cluster((CPU_HEAD, gpu_node("H100", 8)))
ONE_L4 = Cluster((gpu_node("L4"),))  # a 24 GB card (22.0 GiB as the driver reports it)
LAPTOP = Cluster(({"CPU": 4.0},))


def sd35(tmp_path, global_batch: int = 24, *overrides: str):
    """jobs/sd35.yaml with the split left to auto: workers, micro-batch and accumulation."""
    raw = yaml.safe_load((ROOT / "jobs" / "sd35.yaml").read_text())
    for key in ("grad_accum", "use_gpu", "batch_size"):
        raw["train"].pop(key)
    raw["output_dir"] = str(tmp_path)
    return load_job(raw=raw, overrides=["train.num_workers=auto", "train.batch_size=auto",
                                        f"train.global_batch_size={global_batch}", *overrides])


def tiny(tmp_path, *overrides: str):
    return load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path}", "train.batch_size=auto",
                                                  "train.global_batch_size=8", *overrides])


def estimate_gib(cfg, batch: int, workers: int) -> float:
    """The sd35 job's per-GPU estimate, with its settings spelled out (as driver/checks.py computes it)."""
    return estimate(TransformerShape.from_config(KNOWN_TRANSFORMERS[LARGE]), dtype="bf16", targets="attention",
                    rank=16, batch=batch, resolution=1024, t5_tokens=154, num_workers=workers, strategy="ddp",
                    mixed_precision="bf16", quantization=cfg.model.quantize, vae_params=SD3_VAE_PARAMS,
                    validation_resolution=1280, gradient_checkpointing=cfg.train.gradient_checkpointing,
                    optimizer="adamw").total / GIB


@pytest.mark.parametrize("cluster,card,workers,overrides", [
    (ONE_H100, "H100-80GB", 1, []),
    (EIGHT_H100, "H100-80GB", 8, []),
    (ONE_L4, "L4-24GB", 1, ["train.gradient_checkpointing=true"]),
    (ONE_L4, "L4-24GB", 1, ["model.quantize=int8", "train.gradient_checkpointing=true"]),
    (Cluster((gpu_node("H200"),)), "H200-141GB", 1, []),
], ids=["1xH100", "8xH100-cpu-head", "L4-checkpointing", "L4-int8", "1xH200"])
def test_the_largest_micro_batch_that_fits_keeps_the_global_batch(tmp_path, cluster, card, workers, overrides):
    cfg = sd35(tmp_path, 24, *overrides)
    notes = resolve_auto(cfg, cluster)
    t, limit = cfg.train, 0.9 * GPU_GIB[card]
    divisors = [b for b in range(1, 24 // workers + 1) if (24 // workers) % b == 0]
    fitting = [b for b in divisors if estimate_gib(cfg, b, workers) <= limit]
    assert fitting, "each case has a micro-batch that fits"
    assert t.batch_size == fitting[-1]
    larger = [b for b in divisors if b > t.batch_size]
    if larger:  # the next divisor up does not fit: this is the largest
        assert estimate_gib(cfg, larger[0], workers) > limit
    assert (t.num_workers, t.global_batch, t.global_batch_size) == (workers, 24, 24)
    assert t.grad_accum == 24 // (workers * t.batch_size)
    line = notes[-1]
    assert line.startswith(f"train.batch_size auto -> {t.batch_size} (estimate "
                           f"{estimate_gib(cfg, t.batch_size, workers):.1f} of {GPU_GIB[card]:.1f} GiB on {card}")
    assert line.endswith(f"grad_accum {t.grad_accum}: global batch 24 = {workers} worker{'s' * (workers > 1)} x "
                         f"{t.batch_size} x {t.grad_accum}")


def test_the_shipped_split_is_what_auto_picks_on_an_h100(tmp_path):
    """jobs/sd35.yaml's hand-made split (3 workers x 2 x accum 2) is the estimate's choice for its global batch."""
    cfg = sd35(tmp_path, 12, "train.num_workers=3", "train.use_gpu=true")
    resolve_auto(cfg, Cluster((CPU_HEAD, gpu_node("H100", 8))))
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (2, 2)


def test_tiny_job_on_gpus_and_on_a_laptop(tmp_path):
    cfg = tiny(tmp_path)
    assert "CPU workers: no memory limit is modelled" in resolve_auto(cfg, LAPTOP)[-1]
    assert (cfg.train.num_workers, cfg.train.batch_size, cfg.train.grad_accum) == (2, 4, 1)
    cfg = tiny(tmp_path)
    note = resolve_auto(cfg, Cluster((gpu_node("H100", 8),)))[-1]
    assert (cfg.train.num_workers, cfg.train.batch_size, cfg.train.grad_accum) == (8, 1, 1)
    assert "on H100-80GB" in note  # the tiny model fits at once: the whole share of 8 / 8 workers


def test_elastic_workers_keep_the_global_batch_on_every_count(tmp_path):
    cfg = tiny(tmp_path, "train.num_workers=[2,4]", "train.global_batch_size=24")
    resolve_auto(cfg, LAPTOP)
    t = cfg.train
    # 6 per worker at 4; 6 and 3 would leave 3 workers an uneven share of 4 or 8 micro-batches: 2 is the largest.
    assert (t.batch_size, t.grad_accum) == (2, 3)
    assert [t.batch_size * t.accum_for(w) * w for w in (2, 3, 4)] == [24, 24, 24]


@pytest.mark.parametrize("cluster,says", [
    (Cluster((gpu_node("T4"),)), "Ray names the GPU T4, whose memory is not in raytune_sd3/hardware.py"),
    (Cluster((gpu_node(None),)), "the GPU nodes carry no accelerator_type resource"),
    (Cluster((CPU_HEAD,), autoscaling=True), "the cluster has no GPU node up yet"),
])
def test_an_unknown_card_gets_batch_1_and_says_how_to_choose(tmp_path, cluster, says):
    cfg = sd35(tmp_path, 24, "train.num_workers=2", "train.use_gpu=true")
    note = resolve_auto(cfg, cluster)[-1]
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (1, 12)
    assert says in note and "set train.batch_size by hand" in note and "--gpu" in note


def test_an_ambiguous_ray_label_plans_for_its_smallest_card(tmp_path):
    cfg = sd35(tmp_path, 24, "train.gradient_checkpointing=true")
    note = resolve_auto(cfg, Cluster((gpu_node("A100"),)))[-1]
    assert "on A100-40GB, the smallest card Ray's A100 may be" in note
    small = cfg.train.batch_size
    labelled = gpu_node("A100")
    labelled["accelerator_type:A100-80G"] = 1.0  # the label Ray documents for adding by hand
    cfg = sd35(tmp_path, 24, "train.gradient_checkpointing=true")
    assert "on A100-80GB" in resolve_auto(cfg, Cluster((labelled,)))[-1]
    assert cfg.train.batch_size > small


def test_a_resolved_job_passes_through_and_the_resume_guard_sees_its_values(tmp_path):
    cfg = sd35(tmp_path)
    resolve_auto(cfg, ONE_H100)
    saved = yaml.safe_load(dump_job(cfg))
    assert (saved["train"]["batch_size"], saved["train"]["grad_accum"], saved["train"]["global_batch_size"]) == (
        cfg.train.batch_size, cfg.train.grad_accum, 24)
    again = load_job(raw=saved)
    assert resolve_auto(again, Cluster((gpu_node("H200"),))) == []  # job.yaml runs as itself, on any cluster
    assert again.train == cfg.train

    guard_resume(cfg, restart=False)
    settings = yaml.safe_load(RunLayout.of(cfg).settings.read_text())
    assert settings["train"]["batch_size"] == cfg.train.batch_size  # the resolved value, not "auto"
    rerun = sd35(tmp_path)
    resolve_auto(rerun, ONE_H100)
    guard_resume(rerun, restart=False)  # the same cluster: the same split, resumed
    (RunLayout.of(cfg).run_dir / "checkpoint_000001").mkdir()  # a checkpoint to resume: another split is refused
    moved = sd35(tmp_path)
    resolve_auto(moved, Cluster((gpu_node("H200"),)))
    with pytest.raises(ConfigError, match=rf"train.batch_size: {cfg.train.batch_size} -> {moved.train.batch_size}"):
        guard_resume(moved, restart=False)

    report_only = sd35(tmp_path)  # a study's --report-only: the split its run chose, without Ray
    resolve_as_saved(report_only, again)
    assert (report_only.train.batch_size, report_only.train.grad_accum) == (cfg.train.batch_size, cfg.train.grad_accum)


@pytest.mark.parametrize("overrides,message", [
    (["train.batch_size=auto"], r"train.batch_size auto keeps a global batch that you give: set "
                                r"train.global_batch_size"),
    (["train.batch_size=auto", "train.global_batch_size=8", "train.grad_accum=2"],
     r"train.grad_accum 2: with train.batch_size auto it is chosen"),
    (["train.batch_size=auto", "train.global_batch_size=10", "train.num_workers=3"],
     r"train.global_batch_size 10 cannot be shared evenly by \[3\] worker\(s\).*--set train.global_batch_size=12"),
    (["train.batch_size=auto", "train.global_batch_size=12", "train.num_workers=[2,5]"],
     r"cannot be shared evenly by \[5\] worker\(s\) \(train.num_workers \[2, 5\]\).*multiple of 60"),
    (["train.global_batch_size=10", "train.num_workers=2"],
     r"train.global_batch_size 10 is not train.batch_size x grad_accum x workers = 4 x 1 x 2 = 8"),
    (["train.batch_size=0"], r"train.batch_size: must be at least 1 \(or auto"),
])
def test_bad_combinations_are_config_errors_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path}", *overrides])


def test_a_global_batch_the_resolved_workers_cannot_share_stops_before_training(tmp_path):
    cfg = tiny(tmp_path, "train.global_batch_size=9")  # num_workers auto: known only on the cluster
    with pytest.raises(ConfigError, match=r"global_batch_size 9 cannot be shared evenly by \[2\].*resolved to 2"):
        resolve_auto(cfg, LAPTOP)


def test_the_check_shows_what_auto_becomes(tmp_path):
    """The real CLI, as a user runs it on this CPU machine: the tiny job (a CPU target) and SD3.5 on an H100."""
    job = tmp_path / "auto.yaml"
    raw = yaml.safe_load((ROOT / "jobs" / "sd35.yaml").read_text())
    del raw["train"]["grad_accum"]
    raw["train"].update(batch_size="auto", global_batch_size=4, num_workers=1)  # --gpu is one card
    job.write_text(yaml.safe_dump(raw))
    runs = [subprocess.run([sys.executable, "-m", "raytune_sd3.check", *args, "--skip-paths"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
            for args in ([str(ROOT / "jobs" / "tiny.yaml"), "--set", f"output_dir={tmp_path}", "--set",
                          "train.batch_size=auto", "--set", "train.global_batch_size=16"],
                         [str(job), "--gpu", "H100-80GB"])]
    assert runs[0].returncode == 0, runs[0].stdout + runs[0].stderr
    assert ("[ok]   auto     train.batch_size auto -> 8 (CPU workers: no memory limit is modelled), grad_accum 1: "
            "global batch 16 = 2 workers x 8 x 1") in runs[0].stdout
    assert "2 workers x batch 8 x accum 1" in runs[0].stdout
    assert runs[1].returncode == 0, runs[1].stdout + runs[1].stderr
    assert "train.batch_size auto -> 2 (estimate" in runs[1].stdout and "of 79.6 GiB on H100-80GB" in runs[1].stdout
    assert "1 workers x batch 2 x accum 2" in runs[1].stdout


def test_the_check_resolves_auto_for_the_cluster_files_gpu(tmp_path):
    from raytune_sd3.driver.checks import run_checks

    cfg = sd35(tmp_path, 24, "train.num_workers=8", "train.use_gpu=true")
    report = run_checks(cfg, cluster=str(ROOT / "cluster" / "aws-a100.yaml"), skip_paths=True)
    auto = next(line for line in report.lines if "train.batch_size auto" in line)
    assert "of 39.4 GiB on A100-40GB" in auto or "even batch 1 is estimated" in auto and "A100-40GB" in auto
    assert cfg.train.batch_size * cfg.train.grad_accum * 8 == 24


def test_a_study_checks_trials_of_an_auto_job_before_ray(tmp_path):
    """A Tune study's trials are built from the unresolved job's dump (grad_accum 1 beside auto) before Ray."""
    from raytune_sd3.tune.config import check_study

    check_study(load_job(ROOT / "jobs" / "tune-tiny.yaml", [f"output_dir={tmp_path}", "train.batch_size=auto",
                                                            "train.global_batch_size=8"]))


@pytest.mark.slow  # starts a Ray (about 10-35 s on 2 cores)
def test_a_real_ray_node_names_its_card_to_the_driver(tmp_path):
    """A local Ray whose node advertises a GPU and the resource Ray's NVIDIA manager adds on an H100 node
    (`accelerator_type:H100`, ray/_private/resource_and_label_spec.py): the driver reads the card off ray.nodes()."""
    script = f"""
import ray, yaml
from raytune_sd3.config import load_job
from raytune_sd3.driver.placement import read_cluster, resolve_auto
ray.init(address="local", num_cpus=1, num_gpus=1, resources={{"accelerator_type:H100": 1}}, include_dashboard=False,
         log_to_driver=False)
try:
    raw = yaml.safe_load(open({str(ROOT / "jobs" / "sd35.yaml")!r}))
    for key in ("grad_accum", "use_gpu", "batch_size"):
        raw["train"].pop(key)
    raw["output_dir"] = {str(tmp_path)!r}
    cfg = load_job(raw=raw, overrides=["train.num_workers=auto", "train.batch_size=auto",
                                       "train.global_batch_size=24"])
    print(resolve_auto(cfg, read_cluster(cfg))[-1])
finally:
    ray.shutdown()
"""
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "train.batch_size auto -> 3 (estimate 71.3 of 79.6 GiB on H100-80GB" in run.stdout
