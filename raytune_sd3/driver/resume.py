"""Rerunning a job continues its run (Ray Train resumes from the last checkpoint), and only with the settings it
had: a rerun with other settings in the same output_dir is refused with the differing keys; --restart starts over.
A Tune study in an output_dir is resumed (same job), restarted or reported, never mixed with another.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import yaml

from raytune_sd3 import atomic
from raytune_sd3.config import REDACTED, ConfigError, JobConfig, dump_job, redact
from raytune_sd3.run_layout import RunLayout

# Keys that may change between a run and its resumption; any other change means a different run.
RESUMABLE_CHANGES = {"max_steps", "checkpoint_every", "keep_checkpoints", "max_failures", "eval_every",
                     "max_nonfinite_steps", "divergence_factor", "grad_norm_limit"}
log = logging.getLogger("raytune_sd3")


def run_settings(cfg: JobConfig) -> dict:
    """The settings that define a run's trajectory (what a resumed run must share with the one it continues)."""
    d = cfg.model_dump(mode="json", include={"model", "text", "data", "flow", "lora", "train"})
    d["train"] = {k: v for k, v in d["train"].items() if k not in RESUMABLE_CHANGES}
    for k in ("encode_batch_size", "encode_actors"):
        d["data"].pop(k)
    return d


def schema_default(section: str, key: str):
    """A key's default (as JSON) in the job schema: what a run recorded before the key existed ran with (None for
    a key without one)."""
    field = getattr(JobConfig.model_fields[section].annotation, "model_fields", {}).get(key)
    if field is None or field.is_required():
        return None
    value = field.get_default(call_default_factory=True)
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def guard_resume(cfg: JobConfig, restart: bool) -> None:
    """Refuse to silently continue an earlier run in output_dir that had other settings; --restart starts over."""
    from raytune_sd3.train.checkpoint import any_on_storage  # imported here for start-up time: it loads torch

    layout = RunLayout.of(cfg)
    folder, path = layout.run_dir, layout.settings
    if restart and folder.exists():
        shutil.rmtree(folder)
    settings = redact(run_settings(cfg))  # a file beside the checkpoints: no secret in it (or in the error below)
    if path.exists():
        old = json.loads(path.read_text())
        diffs = [_change(f"{sec}.{k}", was, v) for sec, vals in settings.items() for k, v in vals.items()
                 if (was := old.get(sec, {}).get(k, schema_default(sec, k))) != v]
        if diffs and not any_on_storage(folder):  # it failed before its first checkpoint: nothing to resume
            log.info("%s: the earlier run there left no checkpoint; starting over with this job's settings (%s)",
                     folder, "; ".join(diffs))
            shutil.rmtree(folder)
        elif diffs:
            raise ConfigError(
                f"{folder} holds a run with other settings, which this job would resume:\n  " + "\n  ".join(diffs)
                + "\nUse another output_dir or name for a new run, or pass --restart to discard the old one.")
    atomic.write_text(path, json.dumps(settings, indent=1))


def validation_changes(cfg: JobConfig) -> list[str]:
    """The validation settings of this job that differ from those its finished run in output_dir recorded
    (job.yaml), as `key: old -> new` lines; secrets are not shown."""
    saved = RunLayout.of(cfg).job
    try:
        old = yaml.safe_load(saved.read_text()).get("validation") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return []
    new = redact(cfg.model_dump(mode="json")["validation"])
    return [_change(f"validation.{k}", was, v) for k, v in new.items()
            if redact(was := old.get(k, schema_default("validation", k))) != v]


def finished_run(cfg: JobConfig) -> tuple[int, Path] | None:
    """(step, LoRA file) of a finished run of this very job in output_dir, found without Ray: its settings are this
    job's (`auto` read as that run resolved it), its newest complete checkpoint is at train.max_steps, and its LoRA
    was copied out. None otherwise (a longer max_steps, other settings: the normal path decides)."""
    from raytune_sd3.driver.placement import resolve_as_saved
    from raytune_sd3.train.checkpoint import newest_on_storage  # imported here for start-up time: it loads torch

    layout = RunLayout.of(cfg)
    saved, settings, lora = layout.job, layout.settings, layout.lora
    if not (saved.is_file() and settings.is_file() and lora.is_file()):
        return None
    from raytune_sd3.config import load_recorded_job

    try:
        resolved = cfg.model_copy(deep=True)
        resolve_as_saved(resolved, load_recorded_job(saved, cfg))
        same = json.loads(json.dumps(redact(run_settings(resolved)))) == json.loads(settings.read_text())
    except (ConfigError, ValueError, OSError):  # an unreadable record: let the normal path say what is wrong
        return None
    if not same:
        return None
    newest = newest_on_storage(layout.run_dir)
    return (newest[0], lora) if newest and newest[0] == cfg.train.max_steps else None


def _change(key: str, old, new) -> str:
    """One line of a refused resume. Where the old value held a secret, the new one is not shown either: it may be
    the same secret, no longer known as one (its environment variable is not set in this shell)."""
    if REDACTED in str(old):
        return f"{key}: {old!r} -> another value (or the same secret, not marked as one here by its variable)"
    return f"{key}: {old!r} -> {new!r}"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def guard_study(cfg: JobConfig, resume: bool, restart: bool, report_only: bool) -> None:
    """Refuse to mix two studies in one output_dir: an existing one is resumed (same job), restarted or reported."""
    from ray import tune

    layout = RunLayout.of(cfg)
    out, path = layout.output_dir, layout.run_dir
    exists = tune.Tuner.can_restore(path)
    if report_only:
        if not exists:
            raise ConfigError(f"{path}: no study to report on")
        return
    if restart:
        for p in (path, layout.trials):
            shutil.rmtree(p, ignore_errors=True)
        for report_file in layout.study_report:
            report_file.unlink(missing_ok=True)
        return
    if exists and not resume:
        raise ConfigError(f"{out} already holds a study ({path}). Pass --resume to continue it, --restart to "
                          "discard it, or use another output_dir.")
    saved = layout.job
    if exists and saved.exists():
        old, new = _flat(yaml.safe_load(saved.read_text())), _flat(yaml.safe_load(dump_job(cfg)))
        # Keys in one dump only are fields a code update added or removed, not a change of this study.
        diffs = [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
                 if old[k] != new[k] and not k.startswith("ray.")]
        if diffs:
            raise ConfigError(f"--resume: the study in {out} ran with other settings:\n  " + "\n  ".join(diffs)
                              + "\nResume with the same job, or pass --restart to start over.")
