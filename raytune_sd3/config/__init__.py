"""The job config, at the ground floor of the package (it imports nothing else of ours).

- `schema`: the typed job (JobConfig), validated at the door before Ray or any model starts, the rules across its
  sections, and the `tune:` study over its keys;
- the sections, one module each: `section` (the base, path and size types), `model` (model:, text:), `data`,
  `flow`, `adapter` (lora:), `training` (train:), `validation`, `services` (wandb:, ray:, hub:);
- `optimizers`: the one registry of train.optimizer (what each keeps, needs and refuses);
- `tune_space`: which keys a Tune study may vary, and why the others may not;
- `overrides`: dotted keys (`--set a.b=c`, a trial's parameters);
- `job_file`: the YAML reader's limits (size, depth, aliases, duplicate keys);
- `loading`: file -> overrides -> validation -> absolute paths, with one screen of errors; the resolved dump;
- `secrets`: what never leaves the process (redaction) and messages cut to one screen;
- `errors`: ConfigError.

Everything public is re-exported here: `from raytune_sd3.config import JobConfig, load_job`.
"""

from raytune_sd3.config.adapter import (
    INIT_FROM_SETS,
    LYCORIS_KINDS,
    MAX_LORA_RANK,
    LoraConfig,
    LycorisConfig,
    adapter_problem,
)
from raytune_sd3.config.data import DataConfig, DatasetConfig
from raytune_sd3.config.errors import ConfigError
from raytune_sd3.config.flow import FlowConfig, ScheduledSamplingConfig
from raytune_sd3.config.job_file import JobFileError, parse_yaml, read_yaml_file
from raytune_sd3.config.loading import (
    MAX_ERRORS,
    absolute_paths,
    dump_job,
    load_job,
    load_recorded_job,
    model_is_path,
    use_data_dir,
)
from raytune_sd3.config.model import TINY_MODELS, ModelConfig, TextConfig
from raytune_sd3.config.optimizers import BNB, OPTIMIZERS, POLYNOMIAL_LR_END, OptimizerFacts
from raytune_sd3.config.overrides import apply_overrides, did_you_mean, get_key, set_key
from raytune_sd3.config.schema import Domain, JobConfig, SchedulerConfig, TuneConfig
from raytune_sd3.config.secrets import (
    HEX_KEY,
    JOB_SECRETS,
    NOT_HEX_SECRETS,
    REDACTED,
    SECRET_ENV,
    SECRET_ENV_NAME,
    SECRET_KEY,
    SECRET_NAMES,
    SECRET_VALUE,
    one_screen,
    redact,
    remember_secret,
    secret_values,
    shorten,
    show,
)
from raytune_sd3.config.section import MAX_RESOLUTION, NAME_MAX, FolderPath, PathText, Resolution, Section, is_uri
from raytune_sd3.config.services import HF_TOKEN_ENV, HubConfig, RayConfig, WandbConfig
from raytune_sd3.config.training import (
    QUANTO_KINDS,
    OptimizerName,
    ProdigyConfig,
    TrainConfig,
    check_global_batch,
    quantised_base_problem,
)
from raytune_sd3.config.tune_space import FIXED_KEYS, SEARCH_PACKAGES, TUNABLE_PREFIXES, WHY_NOT, check_key
from raytune_sd3.config.validation import ValidationConfig, parse_resolutions

__all__ = [
    "ConfigError", "JobFileError", "parse_yaml", "read_yaml_file",
    "MAX_ERRORS", "absolute_paths", "dump_job", "load_job", "load_recorded_job", "model_is_path", "use_data_dir",
    "BNB", "OPTIMIZERS", "POLYNOMIAL_LR_END", "OptimizerFacts", "OptimizerName", "ProdigyConfig",
    "apply_overrides", "did_you_mean", "get_key", "set_key",
    "HF_TOKEN_ENV", "INIT_FROM_SETS", "adapter_problem", "MAX_LORA_RANK", "MAX_RESOLUTION", "NAME_MAX", "QUANTO_KINDS", "TINY_MODELS", "DataConfig",
    "DatasetConfig", "Domain", "FlowConfig", "FolderPath", "HubConfig", "JobConfig", "LoraConfig", "LYCORIS_KINDS",
    "LycorisConfig", "ModelConfig", "PathText", "RayConfig", "Resolution", "SchedulerConfig", "ScheduledSamplingConfig",
    "Section", "TextConfig", "TrainConfig", "TuneConfig",
    "ValidationConfig", "WandbConfig", "check_global_batch", "is_uri", "parse_resolutions", "quantised_base_problem",
    "HEX_KEY", "JOB_SECRETS", "NOT_HEX_SECRETS", "REDACTED", "SECRET_ENV", "SECRET_ENV_NAME", "SECRET_KEY",
    "SECRET_NAMES", "SECRET_VALUE", "one_screen", "redact", "remember_secret", "secret_values", "shorten", "show",
    "FIXED_KEYS", "SEARCH_PACKAGES", "TUNABLE_PREFIXES", "WHY_NOT", "check_key",
]
