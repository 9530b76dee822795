"""One preflight for every command that starts work: each failure `train` (and `tune`) reports before training is
found first by `python -m raytune_sd3.check`, in the same words, and `train` refuses with them before Ray starts
(exit 2, nothing written to output_dir). No Ray here: a test that started one would prove nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from PIL import Image

from raytune_sd3.check import main as check_main
from raytune_sd3.train.__main__ import main as train_main
from raytune_sd3.tune.__main__ import main as tune_main


def _photos(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        Image.new("RGB", size, (40 * i % 255, 90, 10)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"photo {i}")
    return folder


def _job(tmp_path: Path, **train) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "output_dir": str(tmp_path / "out"),
        "model": {"pretrained": "tiny-sd3"},
        "data": {"datasets": [{"id": "photos", "instance_data_dir": str(_photos(tmp_path / "photos", [(64, 64)] * 3)),
                               "resolution": 512}], "eval_samples": 1},
        "train": {"num_workers": 1, "batch_size": 1, "max_steps": 2, **train},
    }))
    return job


FAILURES = {
    # what the user changed -> the line check prints, which train must print too
    "hub model not in the local cache": (
        ["--set", "model.pretrained=stabilityai/stable-diffusion-3.5-medium"],
        "[FAIL] model    stabilityai/stable-diffusion-3.5-medium: not in the local HF cache and HF_HUB_OFFLINE=1"),
    "every image held out for eval": (
        ["--set", "data.eval_samples=3"],
        "[FAIL] data     data.eval_samples 3: holds out all 3 images for the eval loss and leaves none to train on"),
    "a bucket the eval hold-out leaves short of a batch": (
        ["--set", "train.batch_size=3"],
        "[FAIL] data     1 of 1 aspect bucket(s) cannot fill one global batch of 3 samples"),
    "more workers than this machine holds": (
        ["--set", "train.num_workers=64", "--set", "train.use_gpu=false"],
        "[FAIL] workers  train.num_workers 64 needs 64 x {CPU: 1}, but this Ray cluster has no GPU"),
}


@pytest.mark.parametrize("name", FAILURES)
def test_check_finds_first_what_train_and_tune_refuse(name, tmp_path, capsys):
    sets, line = FAILURES[name]
    job = str(_job(tmp_path))
    assert check_main([job, *sets]) == 1
    out = capsys.readouterr().out
    assert line in out, out
    assert train_main([job, *sets]) == 2
    err = capsys.readouterr().err
    assert "the preflight (python -m raytune_sd3.check) finds what would stop this job" in err and line in err, err
    assert not (tmp_path / "out" / "job.yaml").exists() and not (tmp_path / "out" / "ray.log").exists()
    assert tune_main([job, *sets]) == 2  # tune's `tune:` section is checked after: the preflight speaks first
    assert line in capsys.readouterr().err


def test_the_fixed_job_passes(tmp_path, capsys):
    assert check_main([str(_job(tmp_path))]) == 0, capsys.readouterr().out


def test_the_hold_out_is_counted_before_the_buckets(tmp_path, capsys):
    """3 square images, batch 2: fine without a hold-out, and 1 held out still leaves a batch. With 2 buckets the
    held-out image may come from either: a failure only some hold-outs cause is a warning naming the bucket."""
    job = str(_job(tmp_path))
    assert check_main([job, "--set", "train.batch_size=2"]) == 0
    assert check_main([job, "--set", "train.batch_size=2", "--set", "data.eval_samples=2"]) == 1
    assert "cannot fill one global batch of 2 samples" in capsys.readouterr().out
    _photos(tmp_path / "photos", [(64, 64)] * 3 + [(64, 32)] * 3)  # 3 more, of another shape
    assert check_main([job, "--set", "train.batch_size=2", "--set", "data.eval_samples=2"]) == 0
    out = capsys.readouterr().out
    assert "[warn] data     bucket(s) 512x512, 704x384: if the eval hold-out (data.eval_samples 2" in out, out


def test_check_describes_the_machine_it_runs_on(tmp_path, capsys):
    import os

    assert check_main([str(_job(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "[ok]   target   no --gpu or --cluster: checked against " in out
    assert f"CPUs on this machine ({os.cpu_count()} core" in out, out


def test_gpu_is_one_card(capsys):
    assert check_main(["jobs/sd35.yaml", "--gpu", "H100-80GB", "--skip-paths"]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] workers  train.num_workers 3 needs 3 GPUs, and --gpu checks against one card" in out
    assert check_main(["jobs/sd35.yaml", "--gpu", "H100-80GB", "--skip-paths", "--set", "train.num_workers=1"]) == 0


# --- storage that must be shared ------------------------------------------------------------------------------------


def test_a_cluster_job_on_this_machines_disk_fails(tmp_path, capsys):
    """/mnt/shared that does not exist would be made on the head's own disk, where no other node sees it."""
    job = str(_job(tmp_path))
    sets = ["--set", "output_dir=/mnt/shared/raytune_sd3/x", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    assert check_main([job, "--cluster", "cluster/aws-h100.yaml", *sets]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] storage  output_dir: /mnt/shared/raytune_sd3/x does not exist yet, and would be made on /" in out
    assert "this machine's own disk, which the other nodes of the cluster of cluster/aws-h100.yaml" in out
    assert "s3://bucket/path or gs://bucket/path" in out
    assert f"[FAIL] storage  data.cache_dir: {tmp_path / 'cache'}" in out
    assert check_main([job, "--gpu", "L4-24GB", *sets]) == 0  # one machine: its own disk is fine


def test_a_shared_mount_passes(tmp_path, monkeypatch, capsys):
    import raytune_sd3.driver.checks as check

    monkeypatch.setattr(check, "mount_of", lambda path: ("/mnt/shared", "nfs4"))  # the OS's mount table
    assert check.shared_storage_problem("output_dir", tmp_path, "a cluster") is None
    monkeypatch.setattr(check, "mount_of", lambda path: ("/mnt/shared", "fuse.gcsfuse"))
    assert check.shared_storage_problem("output_dir", tmp_path, "a cluster") is None
    monkeypatch.setattr(check, "mount_of", lambda path: ("/", "overlay"))
    assert "is on overlay at /" in check.shared_storage_problem("output_dir", tmp_path, "a cluster")


def test_a_relative_output_dir_under_ray_job_submit_is_refused(tmp_path, monkeypatch, capsys):
    """The entrypoint of `ray job submit --working-dir .` runs in Ray's copy of the folder: a relative output_dir
    would land there. check says so, and train refuses before joining the cluster."""
    job = _job(tmp_path)
    copy = tmp_path / "ray_pkg_0123"  # where Ray unpacks the working dir
    copy.mkdir()
    monkeypatch.chdir(copy)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"}}')
    sets = ["--set", "output_dir=outputs/mine"]
    line = f"[FAIL] storage  output_dir: {copy / 'outputs' / 'mine'} is inside Ray's temporary copy of the --working-dir"
    assert check_main([str(job), *sets]) == 1
    assert line in capsys.readouterr().out
    assert train_main([str(job), *sets]) == 2
    err = capsys.readouterr().err
    assert line in err and "--set output_dir=/mnt/shared/raytune_sd3/NAME" in err
    assert check_main([str(job), "--set", f"output_dir={tmp_path / 'abs'}"]) == 0, capsys.readouterr().out


def test_with_no_target_the_memory_is_compared_with_this_machines_gpu(tmp_path, monkeypatch, capsys):
    """On a GPU machine, check with no --gpu compares with the card Ray finds there (its accelerator_type)."""
    from ray._private.accelerators import NvidiaGPUAcceleratorManager as Nvidia

    monkeypatch.setattr(Nvidia, "get_current_node_num_accelerators", staticmethod(lambda: 1))  # the driver's answer
    monkeypatch.setattr(Nvidia, "get_current_process_visible_accelerator_ids", staticmethod(lambda: None))
    monkeypatch.setattr(Nvidia, "get_current_node_accelerator_type", staticmethod(lambda: "L4"))
    assert check_main([str(_job(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "checked against 1 GPU, " in out and "[ok]   memory   fits:" in out and "on L4-24GB" in out, out
