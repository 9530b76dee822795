"""Reading a job: the YAML file, `--data DIR` and `--set` overrides, validation against the schema with one clear
screen of errors, paths made absolute for Ray's workers, and the resolved job written back (secrets stripped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ValidationError

from raytune_sd3.config.errors import ConfigError
from raytune_sd3.config.job_file import JobFileError, read_yaml_file
from raytune_sd3.config.model import TINY_MODELS
from raytune_sd3.config.overrides import apply_overrides, did_you_mean
from raytune_sd3.config.schema import JobConfig
from raytune_sd3.config.secrets import REDACTED, SECRET_KEY, one_screen, redact, shorten, show
from raytune_sd3.config.section import is_uri


def _suggest(model: type[BaseModel], loc: tuple) -> str:
    """A 'did you mean' for an unknown key, found among the fields at that place in the schema."""
    cls: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return ""
        ann = field.annotation
        args = getattr(ann, "__args__", ()) or (ann,)
        cls = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            return ""
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        return ""
    return did_you_mean(str(loc[-1]), list(cls.model_fields))


MAX_ERRORS = 20  # errors listed; the rest are counted ("(+N more)")


def _format_errors(err: ValidationError, source: str) -> str:
    lines = []
    errors = err.errors(include_url=False)
    for e in errors[:MAX_ERRORS]:
        key = shorten(".".join(str(p) for p in e["loc"]) or "(top level)")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_suggest(JobConfig, e['loc'])}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = "<redacted>" if SECRET_KEY.search(str(e["loc"][-1]) if e["loc"] else "") else e.get("input")
            lines.append(f"  {key}: {msg} (got {show(got)})" if e["type"] != "value_error" else f"  {key}: {msg}")
    if len(errors) > MAX_ERRORS:
        lines.append(f"  (+{len(errors) - MAX_ERRORS} more)")
    return one_screen(f"{source}: invalid job config\n" + "\n".join(lines))


def use_data_dir(raw: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """Replace the job's data sets with one folder (captions from a .txt beside each image, else the file name),
    keeping the first data set's resolution: `--data DIR` tries your own images with any job file."""
    data = raw.setdefault("data", {})
    first = (data.get("datasets") or [{}])[0]
    secret = redact(str(folder)) != str(folder)  # its name would show in every report line
    name = urlsplit(str(folder)).path.rstrip("/").rsplit("/", 1)[-1] if is_uri(str(folder)) else Path(folder).name
    data["datasets"] = [{"id": (not secret and name) or "data", "type": "local",
                         "instance_data_dir": str(folder),
                         "caption_strategy": "textfile", "resolution": first.get("resolution", 1024),
                         **{k: first[k] for k in ("resolution_type", "crop", "crop_style", "crop_aspect",
                                                  "crop_aspect_buckets") if k in first}}]
    return raw


def load_job(path: str | Path | None = None, overrides: list[str] | None = None, raw: dict | None = None,
             data_dir: str | Path | None = None) -> JobConfig:
    """Read, override and validate a job; raise ConfigError (naming file and key) on anything wrong."""
    source = str(path) if path is not None else "<dict>"
    if raw is None:
        p = Path(path)  # type: ignore[arg-type]
        if not p.is_file():
            raise ConfigError(f"{p}: job file not found (jobs/tiny.yaml is a working example)")
        try:
            raw = read_yaml_file(p)
        except JobFileError as e:
            raise ConfigError(f"{p}: {e}") from None
        raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job is a YAML mapping at the top level")
    if data_dir is not None:
        raw = use_data_dir(raw, data_dir)
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
    return absolute_paths(cfg)


def load_recorded_job(path: str | Path, current: JobConfig) -> JobConfig:
    """The job.yaml a run wrote, read for what that run resolved (its `auto`s). A secret it recorded redacted (a
    redacted webhook URL does not validate) takes the value of the same key in `current`, the job of the command at
    hand, or reads as unset where that has none."""
    def filled(node: Any, given: Any) -> Any:
        if isinstance(node, dict):
            given = given if isinstance(given, dict) else {}
            return {k: filled(v, given.get(k)) for k, v in node.items() if v != REDACTED or given.get(k) is not None}
        if isinstance(node, list):
            given = given if isinstance(given, list) else []
            return [filled(v, given[i] if i < len(given) else None) for i, v in enumerate(node)]
        return given if node == REDACTED else node

    try:
        raw = read_yaml_file(Path(path))
    except JobFileError as e:
        raise ConfigError(f"{path}: {e}") from None
    return load_job(path, raw=filled(raw if isinstance(raw, dict) else {}, current.model_dump(mode="json")))


def absolute_paths(cfg: JobConfig) -> JobConfig:
    """Relative paths are relative to where the command runs; Ray workers run elsewhere, so fix them now."""
    cfg.output_dir = cfg.output_dir.expanduser().resolve()
    if cfg.data.cache_dir is not None and not is_uri(cfg.data.cache_dir):
        cfg.data.cache_dir = str(Path(cfg.data.cache_dir).expanduser().resolve())
    for ds in cfg.data.datasets:
        if isinstance(ds.instance_data_dir, Path):
            ds.instance_data_dir = ds.instance_data_dir.expanduser().resolve()
        if isinstance(ds.path, Path):
            ds.path = ds.path.expanduser().resolve()
        if ds.dataset is not None and not is_uri(ds.dataset) and Path(ds.dataset).expanduser().is_dir():
            ds.dataset = str(Path(ds.dataset).expanduser().resolve())  # a folder here, not a hub id
        if isinstance(ds.metadata_file, Path):
            ds.metadata_file = ds.metadata_file.expanduser().resolve()
        if ds.urls is not None:  # shard patterns: a local one made absolute, its braces kept
            urls = [u if is_uri(u) else str(Path(u).expanduser().resolve()) for u in ds.urls_list]
            ds.urls = urls[0] if isinstance(ds.urls, str) else urls
    if cfg.train.deepspeed_config is not None:
        cfg.train.deepspeed_config = cfg.train.deepspeed_config.expanduser().resolve()
    if cfg.lora.init_from is not None:
        cfg.lora.init_from = cfg.lora.init_from.expanduser().resolve()
    if model_is_path(cfg.model.pretrained):
        cfg.model.pretrained = str(Path(cfg.model.pretrained).expanduser().resolve())
    return cfg


def model_is_path(pretrained: str) -> bool:
    """Whether model.pretrained names a local folder rather than a hub id or a tiny model: a folder that exists
    here (`relmodel` in the working directory), or anything written as a path (./, /, ~, or more than one slash:
    hub ids are `owner/name`)."""
    if pretrained in TINY_MODELS:
        return False
    return (pretrained.startswith((".", "/", "~")) or pretrained.count("/") > 1
            or Path(pretrained).expanduser().is_dir())




def dump_job(cfg: JobConfig) -> str:
    """The resolved job as YAML (every default filled in, secrets stripped): loadable by load_job."""
    return yaml.safe_dump(redact(cfg.model_dump(mode="json")), sort_keys=False)
