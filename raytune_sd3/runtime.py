"""Joining or starting Ray: the cluster in RAY_ADDRESS (or the job's ray.address), else a local Ray."""

from __future__ import annotations

import os

from raytune_sd3.config import JobConfig


def init_ray(cfg: JobConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers import the package from the driver's working tree unless it is installed there.
    env = {"env_vars": {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
                        "TOKENIZERS_PARALLELISM": "false"}}
    if os.environ.get("RAYTUNE_SD3_HOME"):
        env["env_vars"]["RAYTUNE_SD3_HOME"] = os.environ["RAYTUNE_SD3_HOME"]
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        # Inside `ray job submit` (or any existing cluster) resources are the cluster's: never pass num_cpus.
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        return
    # A local Ray with more logical CPUs than cores: Ray Data, Train workers and Tune trials reserve CPUs they
    # mostly wait on; on a 2-core laptop exact accounting deadlocks them.
    num_cpus = cfg.ray.num_cpus or max(4, 2 * (os.cpu_count() or 1))
    # The dashboard process also serves the state API that Train and Tune use to release finished workers.
    ray.init(num_cpus=num_cpus, runtime_env=env)
