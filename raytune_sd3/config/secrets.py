"""What may leave the process: secrets by key name and by value, redacted from every message, dump and log;
messages cut to one screen.

One notion of a secret for the whole project (redact() and the SimpleTuner converter read it).
"""

from __future__ import annotations

import os
import re
import reprlib
from typing import Any

SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "GOOGLE_APPLICATION_CREDENTIALS", "AZURE_STORAGE_KEY", "RAY_AUTH_TOKEN")
# One notion of a secret for the whole project: by its key (ours, W&B's, SimpleTuner's names) or by its value (a
# Hugging Face token; credentials inside a URL). Used by redact() and by convert/rules.py. A key is a secret by its whole
# name, never by a substring: tokenizer_max_length or num_tokens are settings, not credentials.
SECRET_NAMES = ("hub_token", "hf_token", "huggingface_token", "hugging_face_hub_token", "webshart_hf_token",
                "wandb_api_key", "comet_api_key", "neptune_api_token", "aws_access_key_id", "aws_secret_access_key",
                "aws_session_token", "azure_storage_key", "google_application_credentials", "ray_auth_token",
                "webhook_url", "webhook_config")
# Settings whose names end in a credential word: a WebDataset sample's members are named by their "keys".
NOT_SECRET_NAMES = ("image_key", "caption_key")
SECRET_KEY = re.compile(rf"^(?!-*(?:{'|'.join(NOT_SECRET_NAMES)})$)(?:"
                        rf"-*(?:{'|'.join(SECRET_NAMES)})$"  # the credential names SimpleTuner and trackers use
                        # any name that ends in a credential word: my_api_key, s3_secret, password, token
                        r"|.*?(^|_)(token|auth_token|access_token|api_?key|key|secret|secret_key|access_key(_id)?"
                        r"|password|passwd|credentials?|private_key)$)", re.I)
SECRET_VALUE = re.compile(r"\bhf_[A-Za-z0-9]{20,}|:/{1,2}[^/\s:@]+:[^/\s@]+@"  # ":/": a URL made a path
                          # Discord and Slack webhook URLs (their path is the token)
                          r"|\bhttps?:/{1,2}[^\s/]+/api/webhooks/[^\s\"'<>]+|\bhttps?:/{1,2}hooks\.slack\.com/services/[^\s\"'<>]+"
                          # AWS access key ids; GitHub, Slack and OpenAI-style tokens
                          r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b|\b(?:ghp|gho|ghs|ghu|github_pat)_\w{20,}"
                          r"|\bxox[abpr]-[\w-]{10,}|\bsk-[\w-]{20,}")
# A W&B API key is 40 hex digits, as is a git commit: redacted everywhere but a revision (model.revision's commit
# must survive job.yaml) and never inside a path (a hub cache snapshot folder is named by its commit).
HEX_KEY = re.compile(r"(?<![\w/-])[0-9a-fA-F]{40}(?![\w/-])")
NOT_HEX_SECRETS = ("revision",)
# Environment variables whose values are secrets besides SECRET_ENV: by the shape of their names (TOKENIZERS_...
# is not a token); short values (flags, "1") are left alone.
SECRET_ENV_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|ACCESS_KEY|SECRET_KEY|PRIVATE_KEY|KEY)(_|$)",
                             re.I)
REDACTED = "<redacted>"
# Secret values this process has read from a job (validation.webhook_url, which may be any URL): redact() strips
# them wherever they appear, as it does the secrets of the environment. Only remember_secret() adds to it.
JOB_SECRETS: set[str] = set()


def remember_secret(value: str) -> None:
    """From now on redact() strips `value` from anything this process writes (the job's own secrets reach every
    process, driver and Ray workers, through the job, so validating the job remembers them)."""
    JOB_SECRETS.add(value)


def secret_values() -> set[str]:
    """The secrets of this process: the environment's tokens and keys (8 characters or more) and JOB_SECRETS."""
    env = {v for k, v in os.environ.items() if k in SECRET_ENV or SECRET_ENV_NAME.search(k)}
    # An AWS secret key may hold "/": given as a path, its last part alone would show (a folder name, an id).
    parts = {p for v in env for p in v.split("/") if len(p) >= 12 and "/" in v}
    return ({v for v in env if len(v) >= 8} | parts | {os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
            | JOB_SECRETS)


def redact(obj: Any) -> Any:
    """A copy with secret-looking keys, values that look like a token or key (SECRET_VALUE, HEX_KEY) or carry URL
    credentials, and any value holding a secret of the environment replaced by <redacted>."""
    secrets = sorted(secret_values(), key=len, reverse=True)  # a longer secret may contain a shorter one

    def text(x: str, key: str) -> str:
        x = SECRET_VALUE.sub(REDACTED, x)
        if key not in NOT_HEX_SECRETS:
            x = HEX_KEY.sub(REDACTED, x)
        for s in secrets:
            if s and s in x:
                x = x.replace(s, REDACTED)
        return x

    def walk(x: Any, key: str = "") -> Any:
        if isinstance(x, dict):
            return {k: walk(v, str(k)) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v, key) for v in x]
        if SECRET_KEY.search(key) and x is not None:
            return REDACTED
        if isinstance(x, str):
            return text(x, key)
        return x
    return walk(obj)


_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 80, 80, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 6
_SHORT.maxlevel = 3


def show(value: Any) -> str:
    """A value for a message: secrets redacted (before it is cut, so no part of one shows), at most about 100
    characters ('...' marks what was cut)."""
    return shorten(_SHORT.repr(redact(value)))


def shorten(text: str, limit: int = 160) -> str:
    """Free text for a message: secrets redacted, cut to `limit` characters."""
    text = redact(str(text))
    return text if len(text) <= limit else f"{text[:limit - 25]}... ({len(text):,} characters)"


def one_screen(message: str, max_lines: int = 24, width: int = 400) -> str:
    """A message that fits a screen: secrets redacted, each line at most `width` characters, and after `max_lines`
    lines one saying how many more there were."""
    lines = [shorten(line, width) for line in str(message).splitlines()]
    if len(lines) > max_lines:
        lines = [*lines[:max_lines - 1], f"  (+{len(lines) - max_lines + 1} more)"]
    return "\n".join(lines)
