"""A one-GPU machine, as Ray schedules it: a `ray start` head that advertises one GPU (torch still runs on the CPU).
What the first run on a real GPU found (the demo waiting forever for a second GPU, the two caching pools each
waiting for the one GPU, a bug retried until max_failures was spent) must not come back:

- a worker count the machine can never place stops in seconds, before any caching, naming what fits;
- the demo's `auto` workers become one GPU worker; both caching pools share the GPU and release it, so the
  training worker is placed; that worker (whose torch has no CUDA) stops with an error that says so, and the
  same error on the retry ends the run instead of spending train.max_failures.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_gpu_head(tmp_path_factory):
    from tests.ray_head import start_head

    yield from start_head(tmp_path_factory.mktemp("gpu-head") / "head.log", "--num-gpus=1")


def _train(env: dict, tmp: Path, *sets: str, timeout: int = 400) -> tuple[subprocess.CompletedProcess, float]:
    args = [f"output_dir={tmp / 'out'}", f"data.datasets.0.instance_data_dir={tmp / 'demo'}",
            "data.datasets.0.demo_images=16", "data.eval_samples=4", *sets]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml"]
                       + [a for s in args for a in ("--set", s)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return r, time.monotonic() - t0


@pytest.mark.slow
def test_two_workers_on_one_gpu_stop_in_seconds(one_gpu_head, tmp_path):
    r, seconds = _train(one_gpu_head, tmp_path, "train.num_workers=2")
    assert r.returncode == 2, r.stderr[-3000:]
    assert "train.num_workers 2 needs 2 x {CPU: 1, GPU: 1}" in r.stderr
    assert "1 GPU, 4 CPUs on 1 node" in r.stderr and "--set train.num_workers=1 (or auto)" in r.stderr
    assert not (tmp_path / "out" / "manifest.parquet").exists() and not (tmp_path / "demo").exists()  # nothing cached
    print(f"\nrefused in {seconds:.1f} s")
    assert seconds < 120


@pytest.mark.slow
def test_the_demo_caches_and_places_its_worker_on_the_one_gpu(one_gpu_head, tmp_path):
    r, seconds = _train(one_gpu_head, tmp_path, "train.max_failures=3")
    print(f"\nended in {seconds:.1f} s\n{r.stderr[-1500:]}")
    job = yaml.safe_load((tmp_path / "out" / "job.yaml").read_text())
    assert (job["train"]["num_workers"], job["train"]["use_gpu"], job["model"]["dtype"],
            job["train"]["mixed_precision"], job["model"]["text_encoder_dtype"]) == (1, True, "bf16", "bf16", "bf16")
    # Both encoder pools ran on the one GPU (fresh cache: captions and latents encoded) and then let it go.
    report = json.loads((tmp_path / "out" / "cache_report.json").read_text())
    assert report["latents_encoded"] == 16 and report["texts_encoded"] > 0
    # The training worker got the GPU, found that its torch cannot use it, and said so; the retry failed the
    # same way, which ended the run (not 3 more retries).
    assert r.returncode == 1, r.stderr[-3000:]
    assert "sees no CUDA device" in r.stderr and "install a CUDA build of torch" in r.stderr
    assert "attempt 2 failed as an earlier one did" in r.stderr
    log = (tmp_path / "out" / "error.log").read_text()
    assert "Traceback" in log and "sees no CUDA device" in log
