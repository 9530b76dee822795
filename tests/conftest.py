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


def start_local_ray(head: dict[str, str]) -> None:
    """This process's Ray driver, as the suite's in-process tests use it: joined to the session's shared head (the
    environment shared_ray yields). One cluster for the whole suite instead of a second one started in-process: an
    idle cluster that has run Ray Data costs about 7 CPU-s a minute here (its dashboard, agents, idle workers and
    Ray Data's stats and autoscaling actors), and both lived for most of the suite."""
    import ray

    from raytune_sd3.driver.runtime import LOCAL_RAY_ENV_VARS

    os.environ["RAY_AUTH_TOKEN"] = head["RAY_AUTH_TOKEN"]  # the head's token auth: this driver's RPCs carry it
    ray.init(address=head["RAY_ADDRESS"], runtime_env={"env_vars": {
        "HF_HUB_OFFLINE": "1", "RAYTUNE_SD3_HOME": os.environ["RAYTUNE_SD3_HOME"], **LOCAL_RAY_ENV_VARS}})


@pytest.fixture(scope="session")
def shared_ray(tmp_path_factory) -> dict[str, str]:
    """One `ray start` head for the session: the suite's in-process driver joins it (ray_local), and so do a test's
    CLI runs where the test is not about starting Ray: the environment this yields (RAY_ADDRESS, the head's token)
    saves each such run Ray's start, about 10 s on 2 cores. Its workers get what a local Ray's would
    (RAYTUNE_SD3_HOME and the fake AWS keys above, no preemption watcher)."""
    from raytune_sd3.driver.runtime import LOCAL_RAY_ENV_VARS
    from tests.ray_head import start_head

    yield from start_head(tmp_path_factory.mktemp("shared-ray") / "head.log", env=LOCAL_RAY_ENV_VARS)


@pytest.fixture(scope="session")
def ray_local(shared_ray):
    import ray

    if not ray.is_initialized():
        start_local_ray(shared_ray)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fresh_ray(ray_local, shared_ray):
    """ray_local, reconnected for one module. In the full suite (2026-12-07, twice in a row, never alone) the
    session's long-lived in-process Ray stopped hearing from its GCS (its subscriber poll no longer outstanding):
    a Ray Data actor pool then waited for ever for actors that were ALIVE. A new driver connection avoids that."""
    ray_local.shutdown()
    start_local_ray(shared_ray)
    yield ray_local


DEMO_IMAGES = 24  # the demo runs that share demo_cache train on this many of the demo's images


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """One cache folder for the demo runs whose subject is not the caching stage (a lost worker or node, a drain
    notice, DeepSpeed against DDP), all on jobs/tiny.yaml's first DEMO_IMAGES images with no validation prompts: the
    first to run fills it, the others find it warm, as a user's rerun does (entries are keyed by content, so the same
    images, model and settings give the same keys). Each warm start saves a Ray Data pass and its two encoder
    actors (about 13 s here)."""
    return tmp_path_factory.mktemp("demo-cache")


# moto 5 answers CompleteMultipartUpload with a <CompleteMultipartUploadResponse> root where S3 sends
# <CompleteMultipartUploadResult>; the AWS C++ SDK under pyarrow then reads the 200 as an error. The server is
# otherwise real S3 over HTTP, so it runs with that one element renamed.
S3_SERVER = """
import sys
import moto.s3.responses as r
from moto.server import main

plain = r.S3Response.serialized

def serialized(self, result):
    status, headers, body = plain(self, result)
    if self.data.get("Action") == "CompleteMultipartUpload":
        body = body.replace(b"MultipartUploadResponse" if isinstance(body, bytes) else "MultipartUploadResponse",
                            b"MultipartUploadResult" if isinstance(body, bytes) else "MultipartUploadResult")
    return status, headers, body

r.S3Response.serialized = serialized
main(["-p", sys.argv[1]])
"""


class S3Server:
    """A real S3 protocol server (moto) in its own process on a free local port. `query` is what a URI needs to
    reach it (?endpoint_override=...); `fs` a pyarrow client that may create buckets. `env` for the server:
    INITIAL_NO_AUTH_ACTION_COUNT=0 makes it check credentials, as a real store does."""

    def __init__(self, env: dict | None = None):
        import socket
        import subprocess
        import sys
        import time

        import pyarrow.fs as pafs

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = subprocess.Popen([sys.executable, "-c", S3_SERVER, str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env={**os.environ, **(env or {})})
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            time.sleep(0.1)
        self.endpoint = f"127.0.0.1:{self.port}"
        self.query = f"endpoint_override={self.endpoint}&scheme=http&region=us-east-1"
        self.fs = pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region="us-east-1",
                                    allow_bucket_creation=True)

    def close(self) -> None:
        import subprocess

        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:  # a loaded machine: do not leave it running
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="session")
def s3_endpoint():
    """One moto S3 server for the session (each test module makes its own buckets)."""
    pytest.importorskip("moto")
    server = S3Server()
    yield server
    server.close()


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
