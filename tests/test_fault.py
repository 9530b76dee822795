"""Surviving lost workers: a training worker killed mid-run is replaced, the run resumes from its last checkpoint
and its metrics equal those of an uninterrupted run with the same seed."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _cmd(tmp: Path, out: str) -> list[str]:
    sets = [f"output_dir={tmp / out}", f"data.cache_dir={tmp / 'cache'}",
            f"data.datasets.0.instance_data_dir={tmp / 'demo'}", f"train.max_steps={STEPS}",
            "train.checkpoint_every=4", "train.eval_every=4", "train.max_failures=2", "validation.prompts=[]",
            "data.datasets.0.demo_images=24"]
    return [sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml"] + [a for s in sets for a in ("--set", s)]


def _metrics(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def _our_train_workers(tag: str) -> list[int]:
    """pids of Ray Train workers whose environment carries our tag (other Ray jobs may share this machine)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or b"RayTrainWorker" not in (proc / "cmdline").read_bytes():
                continue
            if f"RAYTUNE_SD3_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """A 2-worker run with nothing going wrong: the trajectory the others must reproduce. Returns its tmp folder."""
    tmp = tmp_path_factory.mktemp("fault")
    env = {**os.environ, "RAYTUNE_SD3_TEST_TAG": uuid.uuid4().hex}
    ref = subprocess.run(_cmd(tmp, "uninterrupted"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]
    return tmp


def _assert_same_trajectory(run: dict[int, dict], reference: dict[int, dict], rel: float) -> None:
    assert sorted(run) == list(range(STEPS + 1))  # every step once, step 0 being the initial eval
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert run[step][key] == pytest.approx(reference[step][key], rel=rel, abs=1e-9), (step, key)
        if "eval_loss" in reference[step]:
            assert run[step]["eval_loss"] == pytest.approx(reference[step]["eval_loss"], rel=rel), step


def _newest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    from raytune_sd3.train.state import newest_on_storage

    return newest_on_storage(run_dir) if run_dir.is_dir() else None


@pytest.mark.slow
def test_killed_worker_resumes_with_identical_metrics(uninterrupted):
    """A worker killed the moment a checkpoint reaches storage, before Ray Train's controller takes the report
    (it polls about every 2 s): the run resumes from that checkpoint, not the one before, and does not rewrite
    the steps up to it (their lines, step times included, are the ones written before the kill)."""
    tmp_path = uninterrupted

    tag = uuid.uuid4().hex
    env = {**os.environ, "RAYTUNE_SD3_TEST_TAG": tag}
    proc = subprocess.Popen(_cmd(tmp_path, "killed"), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    run_dir = tmp_path / "killed" / "ray" / "killed"
    killed_at, before = None, []
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        newest = _newest_checkpoint(run_dir)
        if newest and newest[0] >= 8:  # past the first checkpoint, so "the one before" exists too
            workers = _our_train_workers(tag)
            assert len(workers) == 2, workers
            os.kill(max(workers), signal.SIGKILL)
            killed_at = newest[0]
            before = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] <= killed_at]
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert killed_at is not None and killed_at < STEPS, "the run ended before a worker could be killed"

    after = metrics.read_text().splitlines()
    assert after[:len(before)] == before and len(before) == killed_at + 1  # steps 0..killed_at kept as written
    assert f"resuming from step {killed_at}" in out
    _assert_same_trajectory(_metrics(metrics), _metrics(tmp_path / "uninterrupted" / "metrics.jsonl"), rel=1e-6)


@pytest.mark.slow
def test_elastic_run_on_one_worker_matches_two(uninterrupted):
    """num_workers [1, 2] on a Ray that fits one worker: Ray Train starts one, the loop doubles grad_accum, and
    the same images with the same noise give the 2-worker run's trajectory (up to float summation order)."""
    cmd = _cmd(uninterrupted, "elastic") + ["--set", "train.num_workers=[1,2]", "--set", "ray.num_cpus=4",
                                             "--set", "train.cpus_per_worker=3"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    elastic = _metrics(uninterrupted / "elastic" / "metrics.jsonl")
    assert {m.get("workers") for s, m in elastic.items() if s} == {1}
    reference = _metrics(uninterrupted / "uninterrupted" / "metrics.jsonl")
    _assert_same_trajectory(elastic, reference, rel=1e-4)
    # Before training both hold the same weights: the eval loss, its forwards shared over 2 ranks or run on 1, is the
    # same but for the order of its float64 sums.
    assert elastic[0]["eval_loss"] == pytest.approx(reference[0]["eval_loss"], rel=1e-9)
