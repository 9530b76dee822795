import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raytune_sd3.config import ConfigError, dump_job, load_job, parse_resolutions, redact
from raytune_sd3.driver.preflight import check_paths

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))


def tiny_raw() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "tiny.yaml").read_text())


@pytest.mark.parametrize("job", JOBS, ids=[p.name for p in JOBS])
def test_every_job_file_validates(job):
    cfg = load_job(job)
    assert cfg.output_dir.is_absolute()
    # the dump is itself a valid job with the same content
    assert load_job(raw=yaml.safe_load(dump_job(cfg))) == cfg


def test_jobs_folder_has_the_shipped_jobs():
    names = {p.name for p in JOBS}
    assert {"tiny.yaml", "sd35.yaml"} <= names


def test_typo_gets_a_suggestion():
    raw = tiny_raw()
    raw["train"]["learning_rat"] = 1e-4
    with pytest.raises(ConfigError, match=r"train\.learning_rat: unknown key \(did you mean 'learning_rate'\?\)"):
        load_job(raw=raw)


def test_typo_in_a_list_item_gets_a_suggestion():
    raw = tiny_raw()
    raw["data"]["datasets"][0]["resolutoin"] = 64
    with pytest.raises(ConfigError, match=r"data\.datasets\.0\.resolutoin: unknown key \(did you mean 'resolution'"):
        load_job(raw=raw)


def test_wrong_type_and_impossible_values_name_the_key():
    raw = tiny_raw()
    raw["train"]["batch_size"] = "four"
    raw["data"]["bucket_alignment"] = 100
    with pytest.raises(ConfigError) as e:
        load_job(raw=raw)
    assert "train.batch_size" in str(e.value)
    assert "data.bucket_alignment: must be a multiple of 16 (VAE /8 x patch 2), got 100; try 96" in str(e.value)


def test_impossible_combination():
    raw = tiny_raw()
    raw["train"]["lr_warmup_steps"] = raw["train"]["max_steps"]
    with pytest.raises(ConfigError, match="lr_warmup_steps"):
        load_job(raw=raw)


def test_set_overrides_any_key():
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", ["train.learning_rate=3e-5", "flow.shift=auto", "lora.targets=[to_q]"])
    assert cfg.train.learning_rate == 3e-5 and cfg.flow.shift == "auto" and cfg.lora.targets == ["to_q"]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_job(ROOT / "jobs" / "tiny.yaml", ["train.learning_rate"])


def test_resolutions():
    assert parse_resolutions("1024x1024,1280x768") == [(1024, 1024), (1280, 768)]
    with pytest.raises(ValueError, match="multiples of 16"):
        parse_resolutions("1000x1000")


def test_secrets_never_reach_the_dump(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecret123")
    raw = tiny_raw()
    raw["validation"]["prompts"] = ["a photo hf_supersecret123"]
    assert "hf_supersecret123" not in dump_job(load_job(raw=raw))
    assert redact({"wandb": {"api_key": "abc"}}) == {"wandb": {"api_key": "<redacted>"}}


def test_cli_rejects_a_typo_fast_before_ray(tmp_path):
    """A typo stops the CLI with exit 2 before anything heavy: neither Ray nor torch has been imported (seen from
    inside the CLI's process, not by timing it)."""
    job = tmp_path / "bad.yaml"
    raw = tiny_raw()
    raw["lora"]["rnak"] = 4
    job.write_text(yaml.safe_dump(raw))
    probe = ("import runpy, sys\n"
             "try:\n    runpy.run_module('raytune_sd3.train', run_name='__main__')\n"
             "finally:\n    print('imported:', sorted(m for m in ('ray', 'torch') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", probe, str(job)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "lora.rnak: unknown key (did you mean 'rank'?)" in r.stderr
    assert str(job) in r.stderr
    assert "Ray" not in r.stdout.replace("imported:", "") + r.stderr.replace("raytune_sd3", "")
    assert "imported: []" in r.stdout


def test_missing_data_folder_is_named(tmp_path):
    raw = tiny_raw()
    raw["data"]["datasets"][0].update(type="local", instance_data_dir=str(tmp_path / "nope"))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", str(job)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "data.datasets[0].instance_data_dir" in r.stderr and "nope" in r.stderr


def test_set_indexes_lists():
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", ["data.datasets.0.instance_data_dir=/tmp/elsewhere"])
    assert str(cfg.data.datasets[0].instance_data_dir) == "/tmp/elsewhere"
    with pytest.raises(ConfigError, match="not an index of the 1-item list"):
        load_job(ROOT / "jobs" / "tiny.yaml", ["data.datasets.3.id=x"])


def test_data_dir_replaces_the_data_sets(tmp_path):
    cfg = load_job(ROOT / "jobs" / "sd35.yaml", data_dir=tmp_path)
    (ds,) = cfg.data.datasets
    assert ds.instance_data_dir == tmp_path and ds.type == "local" and ds.resolution == 1024
    assert ds.caption_strategy == "textfile"


def test_a_local_model_folder_becomes_absolute(tmp_path, monkeypatch):
    """Ray Train workers do not run in the driver's working directory: a relative or ~ model folder must reach them
    absolute (else each worker asks the hub for `relmodel`), while hub ids and tiny names stay as written."""
    tiny = ROOT / "jobs" / "tiny.yaml"
    (tmp_path / "relmodel").mkdir()
    monkeypatch.chdir(tmp_path)

    def pretrained(value: str) -> str:
        return load_job(tiny, [f"model.pretrained={value}"]).model.pretrained

    here = tmp_path.resolve()
    assert pretrained("relmodel") == str(here / "relmodel")  # no slash, but a folder here: a path
    assert pretrained("./relmodel") == str(here / "relmodel")
    assert pretrained("../elsewhere/model") == str(here.parent / "elsewhere" / "model")
    with pytest.raises(ConfigError, match=f"model.pretrained: {here.parent}/elsewhere/model is not a folder"):
        check_paths(load_job(tiny, ["model.pretrained=../elsewhere/model"]))
    assert pretrained("models/sd35/large") == str(here / "models" / "sd35" / "large")  # 2 slashes: not a hub id
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pretrained("~/models/sd35") == str(tmp_path / "home" / "models" / "sd35")
    for name in ("stabilityai/stable-diffusion-3.5-large", "tiny-sd3", "tiny-sd35", "othermodel"):
        assert pretrained(name) == name


WEBHOOK = "https://discord.com/api/webhooks/1234567/AbCdEf-secret_TOKEN"


def test_a_webhook_url_is_a_secret_everywhere():
    raw = tiny_raw()
    raw["validation"].update(webhook_url=WEBHOOK, preview_steps=2)
    cfg = load_job(raw=raw)
    assert cfg.validation.webhook_url == WEBHOOK  # the worker gets it whole
    dumped = dump_job(cfg)
    assert "AbCdEf-secret_TOKEN" not in dumped and "webhook_url: <redacted>" in dumped
    # any URL given as validation.webhook_url is stripped from what this process writes, wherever it appears
    other = "http://127.0.0.1:8080/hook/not-a-discord-path-token"
    raw["validation"]["webhook_url"] = other
    load_job(raw=raw)
    assert redact(f"POST {other} failed") == "POST <redacted> failed"
    # Discord and Slack webhooks look like secrets by themselves
    assert redact({"note": f"see {WEBHOOK}"}) == {"note": "see <redacted>"}
    # the redacted dump names the fix when run as a job file
    with pytest.raises(ConfigError, match=r"--set validation.webhook_url="):
        load_job(raw=yaml.safe_load(dumped))


def test_webhook_errors_never_show_the_url():
    raw = tiny_raw()
    raw["validation"]["webhook_url"] = "ftp://example.com/api/hooks/s3cret"
    with pytest.raises(ConfigError) as e:
        load_job(raw=raw)
    assert "validation.webhook_url: must be an http(s) URL" in str(e.value) and "s3cret" not in str(e.value)
    raw["validation"]["webhook_url"] = ["https://example.com/s3cret"]  # a wrong type shows the input, redacted
    with pytest.raises(ConfigError) as e:
        load_job(raw=raw)
    assert "validation.webhook_url" in str(e.value) and "s3cret" not in str(e.value)


def test_previews_need_a_webhook():
    raw = tiny_raw()
    raw["validation"]["preview_steps"] = 2
    with pytest.raises(ConfigError, match="validation.preview_steps needs validation.webhook_url"):
        load_job(raw=raw)


# --- the door: job files, --set, finite and bounded values (issue 22) -------------------------------------------


def _job_text(tmp_path, text: str) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(text)
    return job


def test_a_job_file_is_read_within_limits(tmp_path):
    base = (ROOT / "jobs" / "tiny.yaml").read_text()
    with pytest.raises(ConfigError, match=r"line 4\d, column 1: key 'train' appears twice .*first on line 2\d"):
        load_job(_job_text(tmp_path, base + "\ntrain:\n  batch_size: 2\n"))
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcdef", "bcdefg", strict=True))
    with pytest.raises(ConfigError, match="aliases .* expand to more than 100,000 values"):
        load_job(_job_text(tmp_path, bomb))
    with pytest.raises(ConfigError, match="nested more than 64 levels"):
        load_job(_job_text(tmp_path, "a: " + "[" * 5000 + "]" * 5000))
    (tmp_path / "latin1.yaml").write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml: byte 15 is not UTF-8 .* save the file as UTF-8"):
        load_job(tmp_path / "latin1.yaml")
    # a YAML error says where, never the text around it (it may hold a key)
    with pytest.raises(ConfigError, match=r"not valid YAML at line 2, column 1: expected ',' or '\}'") as e:
        load_job(_job_text(tmp_path, "wandb: {key: abcdef-my-key\n"))
    assert "abcdef" not in str(e.value)
    # a merge key may override on purpose: it is not a duplicate
    merge = base.replace("train:\n", "train:\n  <<: {max_steps: 7, batch_size: 2}\n")
    cfg = load_job(_job_text(tmp_path, merge))
    assert cfg.train.max_steps == 40 and cfg.train.batch_size == 4  # the mapping's own keys win over the merge


def test_set_errors_are_config_errors():
    tiny = ROOT / "jobs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"--set train.learning_rate: the value is not valid YAML at line 1"):
        load_job(tiny, ["train.learning_rate=[1,2"])
    for bad in ("=@x", "train..seed=1", " =1", "nokey"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE"):
            load_job(tiny, [bad])


@pytest.mark.parametrize("key, value, message", [
    ("train.learning_rate", ".inf", "finite number"),
    ("flow.shift", ".nan", "finite number"),
    ("validation.guidance", ".inf", "finite number"),
    ("validation.skip_layer_scale", "-.inf", "finite number"),
    ("train.adam_beta1", "1.0", "less than 1"),
    ("train.adam_beta2", "-0.1", "greater than or equal to 0"),
    ("train.adam_epsilon", "-1e-8", "greater than 0"),
    ("train.divergence_factor", ".nan", "greater than 1"),
    ("output_dir", "''", "is empty"),
    ("data.datasets.0.instance_data_dir", "''", "is empty"),
    ("data.datasets.0.resolution", str(10**30), "less than or equal to 8192"),
    ("lora.rank", str(10**30), "less than or equal to 1024"),
    ("validation.resolution", "16x0", "each side is 16 to 8192"),
    ("model.pretrained", "https://user:pw@example.com/m", "not a URL"),
])
def test_values_at_the_door(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_job(ROOT / "jobs" / "tiny.yaml", [f"{key}={value}"])


def test_inf_means_never_only_where_documented():
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", ["train.divergence_factor=.inf", "train.grad_norm_limit=.inf"])
    assert cfg.train.divergence_factor == float("inf") and cfg.train.grad_norm_limit == float("inf")


def test_folders_that_are_files_and_bad_path_names(tmp_path):
    tiny = ROOT / "jobs" / "tiny.yaml"
    for key in ("output_dir", "data.cache_dir", "data.datasets.0.instance_data_dir"):
        with pytest.raises(ConfigError, match=f"{key}: .*tiny.yaml' is a file; this must be a folder"):
            load_job(tiny, [f"{key}={tiny}"])
    with pytest.raises(ConfigError, match="NUL byte"):
        load_job(raw={**tiny_raw(), "output_dir": "a\x00b"})
    with pytest.raises(ConfigError, match="a name of 300 bytes; a file or folder name is at most 255"):
        load_job(tiny, [f"output_dir={tmp_path}/{'x' * 300}"])


def test_errors_are_one_screen_and_redacted(monkeypatch):
    monkeypatch.setenv("MYSERVICE_TOKEN", "tok-0123456789-secret")
    raw = tiny_raw()
    raw["flow"]["eval_sigmas"] = [5.0] * 5000 + [float("nan")] * 5000
    raw["train"]["seed"] = "tok-0123456789-secret"
    raw["name"] = ["x" * 100_000]
    with pytest.raises(ConfigError) as e:
        load_job(raw=raw)
    text = str(e.value)
    assert len(text.splitlines()) == 22 and max(len(line) for line in text.splitlines()) <= 400
    assert text.splitlines()[-1] == "  (+4982 more)"  # 5000 NaNs, a seed and a name, 20 of them shown
    with pytest.raises(ConfigError, match=r"train.seed: .*\(got '<redacted>'\)"):
        load_job(ROOT / "jobs" / "tiny.yaml", ["train.seed=tok-0123456789-secret"])


def test_blocks_and_targets_are_checked_against_the_model():
    tiny = ROOT / "jobs" / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"lora.blocks: block\(s\) \[99\] not in tiny-sd3, which has 2 blocks"):
        check_paths(load_job(tiny, ["lora.blocks=[99]"]))
    with pytest.raises(ConfigError, match=r"validation.skip_layers: block\(s\) \[2\] not in tiny-sd3"):
        check_paths(load_job(tiny, ["validation.skip_layers=[2]"]))
    with pytest.raises(ConfigError, match="lora.targets: an empty list trains nothing"):
        check_paths(load_job(tiny, ["lora.targets=[]"]))
    with pytest.raises(ConfigError, match=r"lora.targets: \['attn.to_qq'\] match no linear layer of tiny-sd3"):
        check_paths(load_job(tiny, ["lora.targets=[attn.to_q, attn.to_qq]"]))
    # SD3.5's second attention is in its dual-attention blocks only (block 0 of tiny-sd35)
    check_paths(load_job(tiny, ["model.pretrained=tiny-sd35", "lora.targets=[attn2.to_q]", "lora.blocks=[0]"]))
    with pytest.raises(ConfigError, match=r"\['attn2.to_q'\] match no linear layer of tiny-sd35 in blocks \[1\]"):
        check_paths(load_job(tiny, ["model.pretrained=tiny-sd35", "lora.targets=[attn2.to_q]", "lora.blocks=[1]"]))
