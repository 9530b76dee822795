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

from tests.conftest import DEMO_IMAGES

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12


def _cmd(tmp: Path, out: str, cache: Path) -> list[str]:
    sets = [f"output_dir={tmp / out}", f"data.cache_dir={cache}",
            f"data.datasets.0.instance_data_dir={tmp / 'demo'}", f"train.max_steps={STEPS}",
            "train.checkpoint_every=4", "train.eval_every=4", "train.max_failures=2", "validation.prompts=[]",
            f"data.datasets.0.demo_images={DEMO_IMAGES}"]
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
def uninterrupted(tmp_path_factory, shared_ray, demo_cache) -> Path:
    """A 2-worker run with nothing going wrong: the trajectory the others must reproduce (on the session's shared
    Ray). Returns its tmp folder."""
    tmp = tmp_path_factory.mktemp("fault")
    ref = subprocess.run(_cmd(tmp, "uninterrupted", demo_cache), cwd=ROOT, env=shared_ray, capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-4000:]
    return tmp


def _assert_same_trajectory(run: dict[int, dict], reference: dict[int, dict], rel: float) -> None:
    assert sorted(run) == list(range(STEPS + 1))  # every step once, step 0 being the initial eval
    for step in range(1, STEPS + 1):
        for key in ("loss", "grad_norm", "lr"):
            assert run[step][key] == pytest.approx(reference[step][key], rel=rel, abs=1e-9), (step, key)
        if "eval_loss" in reference[step]:
            assert run[step]["eval_loss"] == pytest.approx(reference[step]["eval_loss"], rel=rel), step


def _whole_checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint folder if it is wholly on storage, judged without train/checkpoint.py (the run
    resumes by its newest_on_storage, so that cannot be this test's oracle): its record is there and every file a DDP
    checkpoint holds loads (a safetensors or torch file cut short by an upload in progress does not)."""
    import torch
    from safetensors.torch import load_file

    try:
        json.loads((folder / "checkpoint.json").read_text())
        load_file(folder / "pytorch_lora_weights.safetensors")
        load_file(folder / "lora_raw.safetensors")
        torch.load(folder / "optimizer_rank0.pt", weights_only=True)
        return int(torch.load(folder / "train_state.pt", weights_only=True)["step"])
    except Exception:  # not there yet, or not whole: a poll, not a verdict
        return None


class NewestCheckpoint:
    """Polled while a run trains: the step of the newest checkpoint of run_dir wholly on storage, or None. A folder
    found whole stays whole (the run writes each once), so a poll loads only the folders not yet seen whole: polling
    every few ms would otherwise take a core from the run it watches (4 file loads per folder per poll)."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.whole = run_dir, {}

    def __call__(self) -> int | None:
        folders = [f.name for f in self.run_dir.glob("checkpoint_*")] if self.run_dir.is_dir() else []
        for name in folders:
            if name not in self.whole and (step := _whole_checkpoint_step(self.run_dir / name)) is not None:
                self.whole[name] = step
        return max((self.whole[n] for n in folders if n in self.whole), default=None)


# --- telling a bug from a lost worker (driver/faults.py), without Ray -------------------------------------------


def _failed(error: Exception, step: int | None) -> Exception:
    error.raytune_sd3_step = step  # as train_loop_per_worker tags it
    return error


def test_an_error_repeated_at_the_same_step_stops_the_run_and_lost_workers_never_do():
    """Ray Train retries every worker error; StopOnRepeatedError (on its controller) stops the run the first time an
    attempt fails as an earlier one did: same type, message and step. Lost workers (their messages name the actor)
    and the same error at another step are retried."""
    from raytune_sd3.driver.faults import RepeatedError, StopOnRepeatedError

    def lost(actor: str) -> Exception:
        return RuntimeError(f"The actor {actor} died unexpectedly before finishing this task.")

    callback = StopOnRepeatedError()
    callback.after_exception(None, {0: lost("ab12"), 1: _failed(ValueError("shapes differ"), 7)})
    callback.after_exception(None, {0: lost("cd34")})  # another lost worker: retried
    callback.after_exception(None, {1: _failed(ValueError("shapes differ"), 8)})  # the same bug, a step later
    callback.after_exception(None, {1: _failed(KeyError("shapes differ"), 7)})  # another type
    with pytest.raises(RepeatedError, match=r"attempt 5 failed as an earlier one did.*a bug, not a lost worker.*"
                                            r"ValueError at step 7: shapes differ"):
        callback.after_exception(None, {0: lost("ef56"), 1: _failed(ValueError("shapes differ"), 7)})
    setup = StopOnRepeatedError()  # before the first step (model loading, say): step None
    setup.after_exception(None, {0: _failed(OSError("no such file: model.safetensors"), None)})
    with pytest.raises(RepeatedError, match="OSError before the first step: no such file"):
        setup.after_exception(None, {0: _failed(OSError("no such file: model.safetensors"), None)})


def test_messages_are_compared_up_to_their_first_2000_characters():
    from raytune_sd3.driver.faults import MESSAGE_CHARS, RepeatedError, StopOnRepeatedError

    callback = StopOnRepeatedError()
    head = "x" * MESSAGE_CHARS
    callback.after_exception(None, {0: _failed(RuntimeError(head + " at 0x7f01"), 3)})  # addresses past the cut
    with pytest.raises(RepeatedError):
        callback.after_exception(None, {0: _failed(RuntimeError(head + " at 0x7f99"), 3)})


def test_a_worker_error_carries_its_step_through_pickling(monkeypatch):
    """train_loop_per_worker tags the error with the step it was training (None during setup), closes the run,
    and the tag survives the pickling that brings the error to Ray Train's controller."""
    import pickle

    from raytune_sd3.train import loop

    closed = []

    class Run:
        def __init__(self, config):
            self.step = None
            self.fail_in = config["fail_in"]

        def setup(self):
            if self.fail_in == "setup":
                raise OSError("no such file: model.safetensors")

        def train(self):
            self.step = 7
            raise ValueError("shapes differ")

        def close(self):
            closed.append(self.fail_in)

    monkeypatch.setattr(loop, "WorkerRun", Run)
    for fail_in, step in (("train", 7), ("setup", None)):
        with pytest.raises(Exception) as raised:
            loop.train_loop_per_worker({"fail_in": fail_in})
        assert pickle.loads(pickle.dumps(raised.value)).raytune_sd3_step == step
    assert closed == ["train", "setup"]


@pytest.mark.slow
def test_killed_worker_resumes_with_identical_metrics(uninterrupted, shared_ray, demo_cache):
    """A worker killed the moment a checkpoint reaches storage, before Ray Train's controller takes the report
    (it polls every 0.5 s on a local Ray or the session's, every 2 s on a cluster): the run resumes from that
    checkpoint, not the one before, and does not rewrite the steps up to it (their lines, step times included, are
    the ones written before the kill)."""
    tmp_path = uninterrupted

    tag = uuid.uuid4().hex
    # On the session's shared Ray: the driver passes its RAYTUNE_SD3_* variables on to the workers it starts.
    env = {**shared_ray, "RAYTUNE_SD3_TEST_TAG": tag}
    proc = subprocess.Popen(_cmd(tmp_path, "killed", demo_cache), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    run_dir = tmp_path / "killed" / "ray" / "killed"
    killed_at, before = None, []
    deadline, newest_checkpoint = time.time() + 300, NewestCheckpoint(run_dir)
    while time.time() < deadline and proc.poll() is None:
        newest = newest_checkpoint()
        if newest is not None and newest >= 8:  # past the first checkpoint, so "the one before" exists too
            workers = _our_train_workers(tag)
            assert len(workers) == 2, workers
            os.kill(max(workers), signal.SIGKILL)
            killed_at = newest
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
def test_elastic_run_shrinks_mid_run_and_matches_two_workers(uninterrupted, demo_cache, monkeypatch):
    """num_workers [1, 2] on a 3-node Ray (a head that holds no training worker, two nodes that hold one each).
    Once step 4's checkpoint is on storage one node is lost, every process of it killed at once: Ray Train restarts
    the group with the one worker that still fits, which resumes from the newest checkpoint with twice the
    grad_accum and reproduces the 2-worker trajectory (the same images with the same noise, up to float summation
    order), keeping the lines written before the loss.

    What Ray 2.60 does, seen here: the node loss is a failure (it counts against max_failures); the restart first
    asks for the old size again, because Ray Data's AutoscalingCoordinator, whose view the elastic policy reads,
    refreshes its node list only every 20 s; that group cannot start, and after the worker group start timeout
    (RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default, 8 s here) Ray tries again, until a try sees one node
    and starts one worker. The timeout bounds only the wait for the group's placement group (ready in under a
    second when it fits), and a try that times out is a controller error, which Ray Train retries without limit:
    it does not count against max_failures."""
    from ray.cluster_utils import Cluster

    # Node death noticed in about 1.5 s instead of Ray's default 15 s (GCS health checks of each raylet).
    fast_death = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                  "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    address_file = Path("/tmp/ray/ray_current_cluster")  # Cluster() records its address there, for other users too
    saved_address = address_file.read_bytes() if address_file.exists() else None
    # Read by Train's controller, which inherits it from the nodes started below.
    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "8")
    # Head: the driver, Ray Train's controller and the cache's encoders; 2 CPUs cannot hold a 3-CPU worker.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "_system_config": fast_death})
    try:
        nodes = [cluster.add_node(num_cpus=3) for _ in range(2)]
        if saved_address is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_bytes(saved_address)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
        cmd = _cmd(uninterrupted, "shrunk", demo_cache) + ["--set", "train.num_workers=[1,2]", "--set", "train.cpus_per_worker=3",
                                               "--set", f"ray.address={cluster.address}"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        metrics = uninterrupted / "shrunk" / "metrics.jsonl"
        run_dir = uninterrupted / "shrunk" / "ray" / "shrunk"
        before, newest_checkpoint = None, NewestCheckpoint(run_dir)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            newest = newest_checkpoint()
            if newest is not None and newest >= 4:
                cluster.remove_node(nodes[1], allow_graceful=False)  # raylet, its workers: the machine is gone
                before = metrics.read_text().splitlines()  # final: nothing of the lost node writes any more
                break
            time.sleep(0.005)
        out, _ = proc.communicate(timeout=600)
    finally:
        cluster.shutdown()
    assert proc.returncode == 0, out[-4000:]
    assert before is not None, "the run ended before a node could be lost"

    resumed = {int(x.split()[0]) for x in out.split("resuming from step ")[1:]}  # one restart that trained
    assert len(resumed) == 1 and 4 <= min(resumed) < STEPS, (resumed, out[-4000:])
    at = resumed.pop()
    after = metrics.read_text().splitlines()
    kept = [ln for ln in before if json.loads(ln)["step"] <= at]
    assert len(kept) == at + 1 and after[:at + 1] == kept  # resumed: steps 0..at as written before the loss
    shrunk = _metrics(metrics)
    assert [shrunk[s]["workers"] for s in range(1, STEPS + 1)] == [2] * at + [1] * (STEPS - at)
    reference = _metrics(uninterrupted / "uninterrupted" / "metrics.jsonl")
    _assert_same_trajectory(shrunk, reference, rel=1e-4)
