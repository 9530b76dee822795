"""The services a job talks to: Weights & Biases it reports to (`wandb:`), the Ray cluster it runs on (`ray:`) and
the Hugging Face Hub it publishes the LoRA to (`hub:`)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raytune_sd3.config.secrets import SECRET_KEY
from raytune_sd3.config.section import Section


class WandbConfig(Section):
    project: str | None = None
    """Weights & Biases project; null (default): no W&B. metrics.jsonl and validation PNGs are written either way."""
    entity: str | None = None
    """W&B team or user; default: the key's default entity."""
    mode: Literal["online", "offline"] = "online"
    """online needs WANDB_API_KEY on every node; offline writes under output_dir/wandb, for `wandb sync` later."""
    group: str | None = None
    """Groups runs in the W&B UI; a Tune study sets it to the study's name."""
    name: str | None = None
    """Run name; default: the job's run name (a Tune trial: its trial id)."""
    tags: list[str] = Field(default_factory=list)
    """W&B tags."""
    log_images: bool = True
    """Also send the validation images."""


class RayConfig(Section):
    address: str | None = None
    """Cluster to join; default: RAY_ADDRESS, else a local Ray started by the job."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a local Ray; default 2x the cores (so Data, Train and Tune do not wait on each other)."""
    autoscaling: bool | None = None
    """Whether the cluster may add nodes while the job waits for its workers. true: a job asking for more than the
    cluster has waits (saying every 30 s what for); false: it stops in seconds naming what fits. Default: false
    for a local Ray and a cluster started by hand (`ray start`), true for a cluster with an autoscaler (the
    cluster launcher's files in cluster/, KubeRay with autoscaling)."""


HF_TOKEN_ENV = "HF_TOKEN"


class HubConfig(Section):
    repo_id: str | None = None
    """Hugging Face Hub model repo (`owner/name`, or `name` under the token's account) that the LoRA, its model card
    and validation images are uploaded to after training; null (default): no upload (the card is still written to
    output_dir). The token comes from the HF_TOKEN environment variable only, never from the job file."""
    private: bool = True
    """Create the repo private (default); false makes a new repo public (an existing repo keeps its visibility)."""
    trigger: str | None = None
    """The word or phrase that calls up what the LoRA learned, shown in the model card; default: the data sets'
    instance_prompt, if they have one."""

    @model_validator(mode="before")
    @classmethod
    def _no_token_here(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            for key in raw:
                if SECRET_KEY.search(str(key)):
                    raise ValueError(f"hub.{key}: a Hub token is never read from the job file (it would end up in "
                                     f"logs and copies of the job); remove it and set {HF_TOKEN_ENV} in the "
                                     "environment instead")
        return raw

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"([A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}", v):
            raise ValueError(f"repo_id is `owner/name` or `name` (letters, digits, -, _ and .), e.g. "
                             f"me/sd35-my-lora, got {v!r}")
        return v
