"""What must exist before Ray starts, checked in seconds on the driver: data folders, metadata files, the model
folder, a DeepSpeed JSON and its rules, W&B credentials. Demo data sets and tiny models are made later."""

from __future__ import annotations

from pathlib import Path

from raytune_sd3.config import ConfigError, JobConfig, model_is_path


def check_paths(cfg: JobConfig) -> None:
    """ConfigError listing every missing or unusable path or credential of the job."""
    problems = []
    for i, ds in enumerate(cfg.data.datasets):
        if ds.type == "local" and not ds.instance_data_dir.is_dir():
            problems.append(
                f"data.datasets[{i}].instance_data_dir: {ds.instance_data_dir} is not a folder "
                "(point it at your images, or use type: demo)"
            )
        if ds.metadata_file is not None and not ds.metadata_file.is_file():
            problems.append(f"data.datasets[{i}].metadata_file: {ds.metadata_file} is not a file")
        elif ds.caption_strategy == "metadata" and ds.instance_data_dir.is_dir():
            from raytune_sd3.data.discovery import read_metadata  # its columns, before any expensive work

            try:
                read_metadata(ds.metadata_file, ds.instance_data_dir)
            except (ValueError, KeyError, OSError) as e:
                problems.append(f"data.datasets[{i}].metadata_file: {e}")
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
    from raytune_sd3.train.tracking import credentials_problem

    if (wandb_problem := credentials_problem(cfg)) is not None:
        problems.append(wandb_problem)
    if problems:
        raise ConfigError("job config refers to missing or unusable paths or credentials:\n  " + "\n  ".join(problems))
