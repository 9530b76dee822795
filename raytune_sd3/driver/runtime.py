"""Joining or starting Ray: the cluster in RAY_ADDRESS (or the job's ray.address), else a local Ray."""

from __future__ import annotations

import json
import os

from raytune_sd3.config import ConfigError, JobConfig, redact


def _job_env_vars() -> dict[str, str] | None:
    """The env_vars of the runtime_env of the `ray job submit` job this driver runs in; None outside a job."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray's job manager for the entrypoint only
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
        return dict(runtime_env.get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


OWN_ENV_PREFIX = "RAYTUNE_SD3_"  # our settings' variables, passed on to every worker

# Set in the workers of a local Ray that this process starts. Ray Train's preemption watcher is an extra actor
# per fit (a process that imports ray.train) polling for the drain notices a cloud sends before it reclaims a spot
# node; a single machine never gets one. Off, a fit on 2 cores reaches its first step ~2.5 s sooner. Train's
# controller polls its workers every 2 s: every 0.5 s, a fit's start, checkpoints and end are taken sooner (a 4-step
# demo run on a running Ray, 2 cores: 37 against 39.5 s). Clusters keep Ray's defaults.
LOCAL_RAY_ENV_VARS = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


started_locally = False  # whether this process's Ray is a local one it started (a cluster's nodes are elsewhere)


def _join_fix(source: str) -> str:
    return (f"Start a cluster there (`ray start --head`), fix the address, or unset {source} to start a local Ray; "
            "a cluster with token auth also needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or "
            "~/.ray/auth_token)")


def _unreachable(address: str) -> str | None:
    """Why nothing listens at a host:port cluster address (its GCS), or None (it answers, or the address is another
    form: auto, ray://, a job's)."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return None
    except OSError as e:
        return e.strerror or type(e).__name__


def local_num_cpus(cfg: JobConfig) -> int:
    """The logical CPUs of a local Ray. More than the cores: Ray Data, Train workers and Tune trials reserve CPUs
    they mostly wait on; on a 2-core laptop exact accounting deadlocks them."""
    return cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1))


def init_ray(cfg: JobConfig, configure_logging: bool = True) -> None:
    """Join the cluster (ray.address, RAY_ADDRESS, or the one a `ray job submit` job runs on), else start a local
    Ray. configure_logging=False leaves Ray's loggers as the caller set them (driver/console.py)."""
    import ray

    if ray.is_initialized():
        return
    # Workers import the package from the driver's working tree unless it is installed there.
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                        "TOKENIZERS_PARALLELISM": "false"}}
    # Our own variables (RAYTUNE_SD3_HOME: where the tiny models are built) reach every worker, on a cluster too.
    env["env_vars"].update({k: v for k, v in os.environ.items() if k.startswith(OWN_ENV_PREFIX)})
    job_env_vars = _job_env_vars()
    if job_env_vars is not None:
        # Inside `ray job submit`, ray.init merges the job's runtime_env (working_dir, excludes, env_vars...) with
        # the one passed here and raises ValueError if both set the same env var, even to the same value. The
        # job's values reach this process and every worker anyway: add only what the job does not set.
        env["env_vars"] = {k: v for k, v in env["env_vars"].items() if k not in job_env_vars}
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if not address and job_env_vars is not None:
        address = "auto"  # a job's entrypoint always runs on a cluster node (Ray normally sets RAY_ADDRESS for it)
    if address:
        # Inside `ray job submit` (or any existing cluster) resources are the cluster's: never pass num_cpus.
        source = "ray.address" if cfg.ray.address else "RAY_ADDRESS"
        if (problem := _unreachable(address)) is not None:  # ray.init would retry a dead address for ever
            raise ConfigError(f"{source}: no Ray cluster answers at {redact(address)} ({problem}). "
                              + _join_fix(source))
        try:
            ray.init(address=address, runtime_env=env if env["env_vars"] else None, log_to_driver=True,
                     configure_logging=configure_logging)
        except ConnectionError:  # Ray's own message is a traceback ending in "Failed to connect"; say what to do
            raise ConfigError(f"{source}: the Ray cluster at {redact(address)} did not let this process join. "
                              + _join_fix(source)) from None
        return
    num_cpus = local_num_cpus(cfg)
    # The dashboard process also serves the state API that Train and Tune use to release finished workers.
    # address="local": always a new instance, never a `ray start` cluster that happens to run on this machine.
    env["env_vars"] = {**{k: v for k, v in LOCAL_RAY_ENV_VARS.items() if k not in os.environ}, **env["env_vars"]}
    for attempt in range(3):
        try:
            ray.init(address="local", num_cpus=num_cpus, runtime_env=env, configure_logging=configure_logging)
            global started_locally
            started_locally = True
            return
        except Exception as e:  # Ray gives its raylet a fixed 30 s to register: a busy laptop can miss that
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
            ray.shutdown()
