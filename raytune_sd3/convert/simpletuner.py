"""SimpleTuner's setup -> a validated job: read its config and data-loader files (files.py), name keys as
SimpleTuner does (legacy aliases, `--` prefixes), drop credentials, apply SimpleTuner's defaults and the config
table, convert each data set, stop on a refusal, then validate the job as any job is (num_train_epochs counted into
train.max_steps where the images are on this machine)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from raytune_sd3.config import ConfigError, load_job
from raytune_sd3.convert.config_keys import ALIASES, CONFIG_RULES, FLAVOURS, SIMPLETUNER_DEFAULTS, epoch_steps
from raytune_sd3.convert.datasets import convert_dataset
from raytune_sd3.convert.files import read_backends, read_config
from raytune_sd3.convert.report import Conversion, ConvertError, stop_if_refused
from raytune_sd3.convert.rules import Scope, apply_rules, as_int, drop_secrets, fmt, is_secret


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"train.batch_size": 4} -> {"train": {"batch_size": 4}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *sections, leaf = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return nested


def convert_simpletuner(config_path: str | Path, backends_path: str | Path, lossy: bool = False) -> Conversion:
    """SimpleTuner's config (JSON, TOML, env or the web UI's form) + data-loader file -> a Conversion whose `job`
    validates as a JobConfig, trained as SimpleTuner would (its defaults applied).

    Raises ConvertError (naming the file) for an unreadable input, one that is not SimpleTuner's, a refused setting
    (unless lossy, for those that only lose something), or one that does not make a valid job."""
    config_path, backends_path = Path(config_path), Path(backends_path)
    conv = Conversion()
    raw, unread = read_config(config_path)
    conv.ignored += unread
    backends = read_backends(backends_path)
    config: dict[str, Any] = {}
    for key, value in raw.items():
        name = ALIASES.get(str(key).lstrip("-"), str(key).lstrip("-"))  # "--key" or "key", current or legacy name
        if name in config and not is_secret(name, config[name]):
            conv.ignored.append(f"{name} = {fmt(config[name])} (set again as {key}: the later value counts, as in "
                                "SimpleTuner)")
        config[name] = value
    if not config.keys() & {"model_family", "pretrained_model_name_or_path", "model_flavour"}:
        raise ConvertError(f"{config_path}: not a SimpleTuner config (it sets none of model_family, "
                           "pretrained_model_name_or_path, model_flavour)")
    if str(config.get("model_family", "sd3")).lower() != "sd3":
        raise ConvertError(f"{config_path}: model_family: {config['model_family']!r} is not trained here: "
                           "raytune_sd3 trains Stable Diffusion 3 / 3.5 only (model_family sd3)")
    if not all(isinstance(b, dict) and b.get("id") for b in backends):
        raise ConvertError(f"{backends_path}: not a SimpleTuner multidatabackend.json (every entry is an object "
                           "with an id)")

    config = drop_secrets(config, "", conv)
    for key in [k for k, v in config.items() if isinstance(v, str) and v.strip().lower() == "false"]:
        # SimpleTuner's loaders pass no argument for the string "false" (a config.env's values are all strings), so
        # the option keeps its default: gradient_checkpointing "false" still checkpoints there
        conv.ignored.append(f"{key} = \"{config.pop(key)}\" (SimpleTuner passes nothing for the string \"false\": "
                            "its default applies; write false, unquoted, in JSON or TOML to turn it off)")
    defaults = {k: v for k, v in SIMPLETUNER_DEFAULTS.items() if k not in config}
    scope = Scope({**defaults, **config}, conv, folder=config_path.parent, defaults=set(defaults),
                  source=config_path)
    apply_rules(CONFIG_RULES, scope)
    if "model.pretrained" not in scope.out:
        scope.out["model.pretrained"] = FLAVOURS["medium"]
        conv.defaults.append(f"model_flavour = \"medium\" (no model named) -> model.pretrained = {FLAVOURS['medium']}")
    if "output_dir" not in scope.out:
        scope.out["output_dir"] = "simpletuner-results"
        conv.defaults.append("output_dir = \"simpletuner-results\" -> output_dir (use shared storage on a cluster)")
    if "seed" not in config:
        scope.note("seed not set: SimpleTuner runs unseeded, this job seeds with train.seed = 0 (reproducible)")
    datasets = [ds for b in backends if (ds := convert_dataset(b, config, conv, backends_path))]
    if not datasets and not conv.never:
        raise ConvertError(f"{backends_path}: no enabled image data set to convert (SimpleTuner's data sets with "
                           "dataset_type image)")
    stop_if_refused(conv, lossy)
    job = _nest(scope.out)
    job.setdefault("data", {})["datasets"] = datasets
    try:
        cfg = load_job(raw=copy.deepcopy(job))
        if "train.max_steps" not in scope.out:
            steps = epoch_steps(as_int(config.get("num_train_epochs", 1)), datasets, cfg.train, conv)
            if steps is not None:
                job["train"]["max_steps"] = steps
                load_job(raw=copy.deepcopy(job))
    except ConfigError as e:
        raise ConvertError(f"{config_path} + {backends_path}: the converted job is not valid:\n{e}") from None
    conv.job = job
    return conv
