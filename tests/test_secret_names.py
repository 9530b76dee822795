"""Which keys are secrets by name (config.SECRET_KEY, used by redact() and the SimpleTuner converter): every
SimpleTuner option name is walked, and exactly its credentials are redacted; a length, a count or a tokenizer
setting never is. No Ray, no models."""

from pathlib import Path

import pytest

from raytune_sd3.config import SECRET_KEY, redact

NAMES = [line.strip() for line in (Path(__file__).parent / "data" / "simpletuner" / "option_names.txt").read_text()
         .splitlines() if line.strip() and not line.startswith("#")]
# SimpleTuner's options and data-loader keys that hold a credential (webhook_config holds the webhook's URL)
SIMPLETUNER_SECRETS = {"aws_access_key_id", "aws_secret_access_key", "aws_session_token", "hf_token",
                       "webshart_hf_token", "webhook_config"}


def test_every_simpletuner_option_name_is_walked_and_only_credentials_are_secret():
    assert len(NAMES) > 500 and "tokenizer_max_length" in NAMES  # the walk covers the whole registry
    secret = {name for name in NAMES if SECRET_KEY.search(name)}
    assert secret == SIMPLETUNER_SECRETS
    redacted = redact({name: "value-123" for name in NAMES})
    assert {k for k, v in redacted.items() if v == "<redacted>"} == SIMPLETUNER_SECRETS
    assert redacted["tokenizer_max_length"] == "value-123"


@pytest.mark.parametrize("name", ["hub_token", "--hub_token", "HF_TOKEN", "wandb_api_key", "WANDB_API_KEY",
                                  "comet_api_key", "webhook_url", "aws_secret_access_key", "password", "api_key",
                                  "my_service_token", "s3_secret", "private_key"])
def test_credential_names_are_secret(name):
    assert SECRET_KEY.search(name)


@pytest.mark.parametrize("name", ["tokenizer_max_length", "t5_max_length", "max_tokens", "num_tokens",
                                  "token_count", "tokenizer", "keyframes", "secret_santa_count", "monkey"])
def test_settings_that_mention_a_credential_word_are_not(name):
    assert not SECRET_KEY.search(name)
