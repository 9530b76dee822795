"""What must exist before Ray starts, checked in seconds on the driver: data folders, metadata files, the model
folder, a DeepSpeed JSON and its rules, W&B and Hub credentials, bitsandbytes, SageAttention and CUDA for what
needs them, validation's CLIP and preview models in the local HF cache. Demo data sets and tiny models are made
later."""

from __future__ import annotations

import importlib.util
import os
from contextlib import AbstractContextManager
from pathlib import Path

from raytune_sd3.config import OPTIMIZERS, ConfigError, DatasetConfig, JobConfig, model_is_path
from raytune_sd3.data.files import redacted, stores_retried_for

# A data set's store that keeps failing (no endpoint answering, no credentials found) is reported after this long:
# GCS's client retries for minutes by default, and the preflight answers in seconds.
STORE_RETRY_S = 15.0


def checking_stores() -> AbstractContextManager[None]:
    """The bound on every store the driver opens while it checks the data sets (check_paths, check's count):
    STORE_RETRY_S. Only there: the caching stage's Ray tasks keep their clients' longer retries."""
    return stores_retried_for(STORE_RETRY_S)


def check_paths(cfg: JobConfig, cuda: bool | None = None) -> None:
    """ConfigError listing every missing or unusable path or credential of the job. `cuda`: whether the machine it
    will train on has CUDA (None: this one, when the job starts a local Ray; see bitsandbytes_problems)."""
    with checking_stores():
        problems = _data_problems(cfg)
    if cfg.train.deepspeed_config is not None and not cfg.train.deepspeed_config.is_file():
        problems.append(f"train.deepspeed_config: {cfg.train.deepspeed_config} is not a file")
    elif cfg.train.deepspeed_config is not None and cfg.train.strategy != "ddp":
        # Its rules here, in the driver: in a worker, Ray Train would retry the error like a lost node.
        from raytune_sd3.train.strategy import deepspeed_config

        try:
            deepspeed_config(cfg, 1 if cfg.train.num_workers == "auto" else cfg.train.max_workers)
        except ConfigError as e:
            problems.append(str(e))
    pretrained = cfg.model.pretrained
    if model_is_path(pretrained) and not Path(pretrained).expanduser().is_dir():
        problems.append(f"model.pretrained: {pretrained} is not a folder (a diffusers SD3 directory or a hub id)")
    else:  # blocks and targets against the model's config, where it is known without weights
        from raytune_sd3.models.layers import layer_problems

        problems += layer_problems(cfg)
        # imported here for start-up time: models.lora_files loads torch
        from raytune_sd3.models.lora_files import init_from_problems

        problems += init_from_problems(cfg)  # and takes the file's rank, alpha, targets into the job
    from raytune_sd3.train.tracking import credentials_problem

    if (wandb_problem := credentials_problem(cfg)) is not None:
        problems.append(wandb_problem)
    # imported here for start-up time: hub.publish loads torch
    from raytune_sd3.hub.publish import token_problem

    if (hub_problem := token_problem(cfg)) is not None:
        problems.append(hub_problem)
    problems += bitsandbytes_problems(cfg, cuda)
    package = OPTIMIZERS[cfg.train.optimizer].package
    if package not in (None, "bitsandbytes") and importlib.util.find_spec(package) is None:  # bitsandbytes: above
        problems.append(f"train.optimizer {cfg.train.optimizer}: needs the {package} package, which is not installed "
                        f"here: pip install {package}")
    if cfg.validation.attention == "sage" and cfg.validation.prompts:
        # imported here for start-up time: train.attention loads torch
        from raytune_sd3.train.attention import SAGE_FIX, sage_available

        if not sage_available():
            problems.append(f"validation.attention sage: the sageattention package is not installed here: {SAGE_FIX}")
        elif cfg.train.use_gpu is False:
            problems.append("validation.attention sage runs on CUDA GPUs only, and train.use_gpu is false: "
                            "set validation.attention: auto")
    if cfg.validation.clip_score or cfg.validation.preview_steps:  # models.loading imports torch: only then
        # imported here for start-up time: models.loading loads torch
        from raytune_sd3.models.loading import VALIDATION_MODELS, validation_model_problem

        problems += [p for key in VALIDATION_MODELS if (p := validation_model_problem(cfg, key)) is not None]
    if problems:
        raise ConfigError("job config refers to missing or unusable paths or credentials:\n  " + "\n  ".join(problems))


def _data_problems(cfg: JobConfig) -> list[str]:
    """check_paths' lines for the data sets: folders, tables, shards and metadata files that cannot be read."""
    problems = []
    for i, ds in enumerate(cfg.data.datasets):
        if ds.type in ("parquet", "huggingface"):
            from raytune_sd3.data.tables import table_problem

            if (problem := table_problem(ds)) is not None:
                problems.append(f"data.datasets[{i}] ({ds.id}, type {ds.type}): {problem}")
            continue
        if ds.type == "webdataset":
            from raytune_sd3.data.webdataset import webdataset_problem

            if (problem := webdataset_problem(ds)) is not None:
                problems.append(f"data.datasets[{i}] ({ds.id}, type webdataset): {problem}")
            continue
        if ds.in_store:
            problems += _store_problems(i, ds)
            continue
        if ds.type == "local" and not ds.instance_data_dir.is_dir():
            problems.append(
                f"data.datasets[{i}].instance_data_dir: {ds.instance_data_dir} is not a folder "
                "(point it at your images, or use type: demo)"
            )
        if isinstance(ds.metadata_file, Path) and not ds.metadata_file.is_file():
            problems.append(f"data.datasets[{i}].metadata_file: {ds.metadata_file} is not a file")
        elif ds.caption_strategy == "metadata" and ds.instance_data_dir.is_dir():
            from raytune_sd3.data.discovery import read_metadata  # its columns, before any expensive work

            try:
                read_metadata(ds.metadata_file, ds.instance_data_dir)
            except (ValueError, KeyError, OSError) as e:
                problems.append(f"data.datasets[{i}].metadata_file: {e}")
    return problems


def _store_problems(i: int, ds: DatasetConfig) -> list[str]:
    """Why a data set in a store cannot be read from here: its client refused the URI, the bucket or prefix is not
    there, the credentials are refused; or its metadata file is missing or unusable. A request or two."""
    from raytune_sd3.data.discovery import read_metadata
    from raytune_sd3.data.sources import DataFolder

    key = f"data.datasets[{i}].instance_data_dir"
    try:
        folder = DataFolder(str(ds.instance_data_dir))
    except Exception as e:  # noqa: BLE001 - pyarrow's or fsspec's refusal of the URI is the reason
        return [f"{key}: {redacted(str(ds.instance_data_dir))}: {type(e).__name__}: {str(e)[:300]} (a folder URI "
                "such as s3://bucket/prefix?endpoint_override=host:9000&scheme=http)"]
    if (problem := folder.problem()) is not None:
        return [f"{key}: {problem}"]
    if ds.caption_strategy == "metadata":
        try:
            read_metadata(ds.metadata_file, folder.name)
        except (ValueError, KeyError, OSError) as e:
            return [f"data.datasets[{i}].metadata_file: {e}"]
    return []


def bitsandbytes_problems(cfg: JobConfig, cuda: bool | None = None) -> list[str]:
    """Why the job's bitsandbytes parts (model.quantize nf4, the 8-bit optimizers) cannot run: not installed, or
    no CUDA where it will train. `cuda` says whether that machine has it (the check command knows its target);
    None: a job that trains on this machine (a local Ray) needs CUDA here, while on a cluster train.use_gpu false
    is refused now and `auto` once Ray says whether the cluster has GPUs (needs_cuda_problem)."""
    # imported here for start-up time: models.quantize, train.optim load torch
    from raytune_sd3.models.quantize import BNB_INSTALL, NF4_NEEDS_CUDA
    from raytune_sd3.train.optim import BNB_FIX

    users = [(what, NF4_NEEDS_CUDA if what == "model.quantize nf4" else
              f"{what} needs bitsandbytes on CUDA, and this job would train without it: {BNB_FIX}")
             for what in cfg.bitsandbytes_parts]
    if not users:
        return []
    if importlib.util.find_spec("bitsandbytes") is None:
        return [f"{what}: needs bitsandbytes, which is not installed here: {BNB_INSTALL}" for what, _ in users]
    if cuda is None:
        local = not (cfg.ray.address or os.environ.get("RAY_ADDRESS")
                     or os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))
        cuda, no_cuda = (_cuda_here() if local else True), "this machine has no CUDA GPU"
    else:
        no_cuda = "the machine checked against has no GPU"
    if cfg.train.use_gpu is False or not cuda:
        why = "train.use_gpu is false" if cfg.train.use_gpu is False else no_cuda
        return [f"{message} ({why})" for _, message in users]
    return []


def needs_cuda_problem(cfg: JobConfig) -> str | None:
    """After Ray resolved train.use_gpu against the cluster: why a bitsandbytes job cannot train there, or None."""
    if cfg.train.use_gpu:
        return None
    what = ("model.quantize nf4" if cfg.model.quantize == "nf4" else f"train.optimizer {cfg.train.optimizer}"
            if OPTIMIZERS[cfg.train.optimizer].cuda_only else None)  # what needs CUDA, not only bitsandbytes
    if what is None:
        return None
    return (f"{what} needs bitsandbytes on CUDA GPUs, and this Ray cluster has none: use model.quantize: int4 "
            "(optimum-quanto) and train.optimizer: lion or adamw, or a cluster with NVIDIA GPUs "
            "(--set train.use_gpu=true on one that starts them on demand)")


def _cuda_here() -> bool:
    import torch

    return torch.cuda.is_available()
