"""Fitting a job to its cluster: `auto` settings from the cluster's GPUs, workers that can never be placed refused
with what fits, and a line every so often while Ray waits for resources. (test_gpu_scheduling.py runs the same on
a real Ray that advertises a GPU.)"""

import logging
from pathlib import Path

import pytest

from raytune_sd3.config import ConfigError, load_job
from raytune_sd3.driver.placement import Cluster, PlacementError, WaitReporter, check_placement, placeable, resolve_auto

ROOT = Path(__file__).resolve().parents[1]
ONE_GPU = Cluster(({"CPU": 16.0, "GPU": 1.0},))
EIGHT_GPUS = Cluster(({"CPU": 192.0, "GPU": 8.0},))
LAPTOP = Cluster(({"CPU": 4.0},))


def _job(tmp_path, *overrides):
    return load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path}", *overrides])


@pytest.mark.parametrize("cluster,workers,dtype,mp,gpu", [
    (ONE_GPU, 1, "bf16", "bf16", True),
    (EIGHT_GPUS, 8, "bf16", "bf16", True),
    (Cluster(({"CPU": 8.0, "GPU": 4.0},) * 2), 8, "bf16", "bf16", True),
    (LAPTOP, 2, "fp32", "no", False),
])
def test_auto_follows_the_clusters_gpus(tmp_path, cluster, workers, dtype, mp, gpu):
    cfg = _job(tmp_path)
    notes = resolve_auto(cfg, cluster)
    assert (cfg.train.num_workers, cfg.model.dtype, cfg.train.mixed_precision, cfg.train.use_gpu) == (
        workers, dtype, mp, gpu)
    assert cfg.model.text_encoder_dtype == ("bf16" if gpu else "fp32")
    assert any(f"num_workers auto -> {workers}" in n for n in notes)
    assert resolve_auto(cfg, Cluster(({"CPU": 1.0},))) == []  # resolved once: a resumed job keeps its values


def test_explicit_values_are_kept(tmp_path):
    cfg = _job(tmp_path, "train.num_workers=3", "model.dtype=fp16", "train.mixed_precision=no",
               "train.use_gpu=false")
    resolve_auto(cfg, EIGHT_GPUS)
    assert (cfg.train.num_workers, cfg.model.dtype, cfg.train.mixed_precision) == (3, "fp16", "no")


def test_use_gpu_without_gpus_asks_for_a_number(tmp_path):
    with pytest.raises(PlacementError, match=r"--set train.num_workers="):
        resolve_auto(_job(tmp_path, "train.use_gpu=true"), LAPTOP)


@pytest.mark.parametrize("kernel", ["flash", "cudnn", "efficient"])
def test_a_gpu_attention_kernel_on_cpus_is_refused(tmp_path, kernel):
    with pytest.raises(ConfigError, match=rf"train.attention {kernel} is a GPU kernel.*train.attention: auto"):
        resolve_auto(_job(tmp_path, f"train.attention={kernel}"), LAPTOP)
    cfg = _job(tmp_path, f"train.attention={kernel}")
    resolve_auto(cfg, ONE_GPU)  # on a GPU it stays
    assert cfg.train.attention == kernel


def test_placeable_counts_whole_bundles_per_node():
    gpu = {"CPU": 1.0, "GPU": 1.0}
    nodes = ({"CPU": 8.0, "GPU": 2.0}, {"CPU": 1.0, "GPU": 4.0}, {"CPU": 32.0})
    assert placeable(gpu, nodes) == 3  # 2 on the first node, 1 on the CPU-starved second, none on the CPU node
    assert placeable(gpu, nodes, "STRICT_SPREAD") == 2
    assert placeable({"CPU": 1.5}, ({"CPU": 4.0},)) == 2


@pytest.mark.parametrize("overrides,cluster,message", [
    (["train.num_workers=2"], ONE_GPU,
     r"train.num_workers 2 needs 2 x \{CPU: 1, GPU: 1\}, but this Ray cluster has 1 GPU, 16 CPUs on 1 node, "
     r"which fits 1 .*--set train.num_workers=1 \(or auto\)"),
    (["train.num_workers=2", "train.placement_strategy=STRICT_SPREAD"], EIGHT_GPUS, r"fits 1 .*num_workers=1"),
    (["train.num_workers=1", "train.use_gpu=true"], LAPTOP, r"fits 0 .*--set train.use_gpu=false"),
    (["train.num_workers=2", "train.cpus_per_worker=8"], LAPTOP, r"fits 0 .*--set train.cpus_per_worker=4"),
    (["train.num_workers=[2,4]", "train.grad_accum=6"], ONE_GPU, r"needs 2 x .*--set train.num_workers=\[1,4\]"),
])
def test_unplaceable_workers_stop_with_what_fits(tmp_path, overrides, cluster, message):
    cfg = _job(tmp_path, *overrides)
    resolve_auto(cfg, cluster)
    with pytest.raises(PlacementError, match=message):
        check_placement(cfg, cluster)


def test_an_autoscaling_cluster_waits_instead(tmp_path, caplog):
    cfg = _job(tmp_path, "train.num_workers=16")
    grows = Cluster(ONE_GPU.nodes, autoscaling=True)
    resolve_auto(cfg, grows)
    with caplog.at_level(logging.WARNING, logger="raytune_sd3.driver.placement"):
        check_placement(cfg, grows)  # no error
    assert "Waiting for the autoscaler" in caplog.text
    check_placement(_job(tmp_path, "train.num_workers=1", "train.use_gpu=true"), ONE_GPU)  # fits: silent


def test_waiting_is_reported_while_a_placement_group_is_pending(ray_local, tmp_path, caplog):
    """A real pending placement group (a GPU on a Ray without one), as Ray Train's is while it waits."""
    from ray.util import placement_group, remove_placement_group

    cfg = _job(tmp_path, "ray.autoscaling=true")
    pg = placement_group([{"CPU": 1, "GPU": 1}])
    try:
        with caplog.at_level(logging.WARNING, logger="raytune_sd3.driver.placement"), WaitReporter(cfg, interval=0.5):
            import time

            deadline = time.monotonic() + 30
            while "waiting" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        remove_placement_group(pg)
    assert "1 x {CPU: 1, GPU: 1} not placed yet" in caplog.text
    assert "the autoscaler may add nodes" in caplog.text
