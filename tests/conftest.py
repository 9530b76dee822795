"""Shared fixtures: offline hub, a tiny SD3 pipeline built once per session, a local Ray."""

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub: a hub lookup with no network hangs instead of failing.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYTUNE_SD3_HOME", tempfile.mkdtemp(prefix="raytune_sd3_home-"))
os.environ.setdefault("RAY_AUTH_MODE", "token")
# Fake credentials for the local S3 server of test_remote_cache (moto accepts any); set before any Ray starts so
# its workers see them, and never a real cloud's metadata endpoint.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "moto-test-key-id")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto-test-secret-key-0123456789")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_sd3() -> str:
    from raytune_sd3.testmodels.tiny import ensure_tiny_pipeline

    return str(ensure_tiny_pipeline("tiny-sd3"))


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        from raytune_sd3.driver.runtime import LOCAL_RAY_ENV_VARS

        ray.init(address="local", num_cpus=4, runtime_env={"env_vars": {
            "HF_HUB_OFFLINE": "1", "RAYTUNE_SD3_HOME": os.environ["RAYTUNE_SD3_HOME"], **LOCAL_RAY_ENV_VARS}})
    yield ray
    ray.shutdown()


def run_gloo_ranks(fn, *args, world: int = 2) -> dict:
    """Run fn(rank, port, *args, out) in `world` spawned processes that form a gloo group on a free local port;
    returns `out`, the dict each rank fills in (fn must live in a test module: the processes import it)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(fn, args=(port, *args, out), nprocs=world, start_method="spawn")
        return dict(out)
