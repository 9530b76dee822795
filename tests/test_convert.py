"""raytune_sd3.convert: SimpleTuner's config.json + multidatabackend.json -> a job YAML that loads, with every setting
we do not convert listed and no secret copied. Real files in tmp_path; no Ray, no models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raytune_sd3.config import load_job
from raytune_sd3.convert import SIMPLETUNER_DEFAULTS, ConvertError, convert_simpletuner, main

ROOT = Path(__file__).resolve().parents[1]
HF_TOKEN = "hf_" + "Q7xkLmN2pRsT4uVwXyZ9aBcDeFgHiJ"  # fake, split so no scanner mistakes it for a real one
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"

# The SD3 quickstart's settings taken together (config.json example, quantised training, stable values, SLG with `--`
# keys); the quickstart's own files, as printed, are in tests/data/simpletuner/
QUICKSTART = {
    "model_type": "lora",
    "model_family": "sd3",
    "pretrained_model_name_or_path": "stabilityai/stable-diffusion-3.5-large",
    "output_dir": "/home/user/outputs/models",
    "validation_resolution": "1024x1024,1280x768",
    "validation_prompt": "your main test prompt here",
    "user_prompt_library": "config/user_prompt_library.json",
    "base_model_precision": "int8-quanto",
    "text_encoder_1_precision": "no_change",
    "text_encoder_2_precision": "no_change",
    "text_encoder_3_precision": "no_change",
    "optimizer": "adamw_bf16",
    "mixed_precision": "bf16",
    "learning_rate": 1e-4,
    "max_train_steps": 2000,
    "train_batch_size": 4,
    "gradient_accumulation_steps": 3,
    "lr_scheduler": "sine",
    "lr_warmup_steps": 100,
    "max_grad_norm": 0.1,
    "grad_clip_method": "norm",
    "lora_rank": 32,
    "lora_alpha": 32,
    "seed": 42,
    "checkpointing_steps": 250,
    "checkpoints_total_limit": 3,
    "validation_steps": 250,
    "validation_num_inference_steps": 28,
    "caption_dropout_probability": 0.1,
    "tokenizer_max_length": 154,
    "t5_padding": "unmodified",
    "report_to": "wandb",
    "tracker_project_name": "sd35-lora",
    "tracker_run_name": "fox",
    "validation_noise_scheduler": "euler",
    "push_to_hub": False,
    "validation_torch_compile": False,
    "hub_token": HF_TOKEN,
    "--validation_guidance_skip_layers": [7, 8, 9],
    "--validation_guidance_skip_layers_start": 0.01,
    "--validation_guidance_skip_layers_stop": 0.2,
    "--validation_guidance_skip_scale": 2.8,
    "--validation_guidance": 4.0,
    "--flow_use_uniform_schedule": True,
    "--flow_schedule_auto_shift": True,
}

BACKENDS = [
    {"id": "pseudo-camera-10k-sd3", "type": "local", "crop": True, "crop_aspect": "square", "crop_style": "center",
     "resolution": 1024, "minimum_image_size": 0, "maximum_image_size": 1024, "target_downsample_size": 1024,
     "resolution_type": "pixel_area", "cache_dir_vae": "/home/user/simpletuner/output/cache/vae/sd3/pseudo-camera-10k",
     "instance_data_dir": "/home/user/simpletuner/datasets/pseudo-camera-10k", "disabled": False,
     "skip_file_discovery": "", "caption_strategy": "filename", "metadata_backend": "discovery"},
    {"id": "subject", "type": "local", "instance_data_dir": "/data/subject", "caption_strategy": "instanceprompt",
     "instance_prompt": "a photo of sks dog", "resolution": 512, "resolution_type": "pixel", "crop": True,
     "crop_style": "center", "repeats": 5},
    {"id": "s3-photos", "type": "aws", "aws_bucket_name": "photos", "aws_secret_access_key": AWS_SECRET,
     "disabled": True},
    {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True,
     "cache_dir": "cache/text/sd3/pseudo-camera-10k", "disabled": False, "write_batch_size": 128},
]


def write_setup(tmp_path: Path, config: dict | None = None, backends: list | None = None) -> tuple[Path, Path]:
    """SimpleTuner's layout: <root>/config/{config.json, multidatabackend.json, user_prompt_library.json}."""
    folder = tmp_path / "simpletuner" / "config"
    folder.mkdir(parents=True)
    (folder / "user_prompt_library.json").write_text(json.dumps({"fox": "a red fox in the snow", "cat": "a cat"}))
    cfg, mdb = folder / "config.json", folder / "multidatabackend.json"
    cfg.write_text(json.dumps(QUICKSTART if config is None else config, indent=2))
    mdb.write_text(json.dumps(BACKENDS if backends is None else backends, indent=2))
    return cfg, mdb


def minimal(**extra) -> dict:
    return {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/models/sd35",
            "output_dir": "/out", **extra}


ONE_SQUARE_SET = [{"id": "photos", "type": "local", "instance_data_dir": "/data/photos", "caption_strategy": "textfile",
                   "resolution": 1024, "resolution_type": "pixel", "crop": True, "crop_style": "center"}]


def test_cli_converts_the_quickstart(tmp_path):
    cfg, mdb = write_setup(tmp_path)
    out = tmp_path / "jobs" / "sd35.yaml"
    command = [sys.executable, "-m", "raytune_sd3.convert", "simpletuner", str(cfg), str(mdb), "-o", str(out)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr
    job = load_job(out)

    assert job.model.pretrained == "stabilityai/stable-diffusion-3.5-large"
    assert (job.model.quantize, job.model.dtype, job.train.mixed_precision) == ("int8", "bf16", "bf16")
    t = job.train
    assert (t.learning_rate, t.max_steps, t.batch_size, t.grad_accum, t.lr_warmup_steps) == (1e-4, 2000, 4, 3, 100)
    assert (t.optimizer, t.adam_epsilon, t.weight_decay, job.lora.dtype) == ("adamw_bf16", 1e-6, 1e-2, "bf16")
    assert (t.max_grad_norm, t.grad_clip, t.seed, t.checkpoint_every, t.keep_checkpoints) == (0.1, "norm", 42, 250, 3)
    assert (job.lora.rank, job.lora.alpha) == (32, 32)
    assert (job.flow.shift, job.flow.sigma_sampling) == ("auto", "uniform")
    assert (job.text.t5_max_length, job.text.t5_padding, job.data.caption_dropout) == (154, "unmodified", 0.1)
    v = job.validation
    assert v.prompts == ["your main test prompt here", "a red fox in the snow", "a cat"]  # + user_prompt_library
    assert v.sizes == [(1024, 1024), (1280, 768)]
    assert (v.guidance, v.steps, v.every_steps) == (4.0, 28, 250)
    assert (v.skip_layers, v.skip_layer_start, v.skip_layer_stop, v.skip_layer_scale) == ([7, 8, 9], 0.01, 0.2, 2.8)
    assert (job.wandb.project, job.wandb.name) == ("sd35-lora", "fox")
    assert [(d.id, d.resolution, d.caption_strategy) for d in job.data.datasets] == [
        ("pseudo-camera-10k-sd3", 1024, "filename"), ("subject", 512, "instanceprompt")]
    assert job.data.datasets[1].instance_prompt == "a photo of sks dog"
    camera, subject = job.data.datasets
    assert (camera.resolution_type, camera.crop, camera.crop_aspect, camera.crop_style) == (
        "pixel_area", True, "square", "center")
    assert (camera.maximum_image_size, camera.target_downsample_size, camera.minimum_image_size) == (1024, 1024, None)
    assert (subject.resolution_type, subject.repeats, subject.crop_aspect) == ("pixel", 5, "square")
    assert str(job.data.datasets[0].instance_data_dir) == "/home/user/simpletuner/datasets/pseudo-camera-10k"

    # what was not converted is listed, the same lines on stdout and as comments atop the job file
    text = out.read_text()
    report = [line.strip() for line in run.stdout.splitlines() if line.startswith("  ")]
    comments = {line[2:] for line in text.splitlines() if line.startswith("# ")}
    assert report and set(report) <= comments
    for expected in ['not converted: lr_scheduler = "sine"', 'not converted: validation_noise_scheduler = "euler"',
                     "ignored: multidatabackend.json[s3-photos] (disabled",
                     'ignored: multidatabackend.json[text-embeds].cache_dir = "cache/text/sd3/pseudo-camera-10k"',
                     'ignored: multidatabackend.json[pseudo-camera-10k-sd3].cache_dir_vae',
                     "dropped secret: hub_token",
                     "dropped secret: multidatabackend.json[s3-photos].aws_secret_access_key",
                     "note: false or null, so nothing to convert: validation_torch_compile",
                     "default: lora_dropout = 0.1 -> lora.dropout = 0.1"]:
        assert any(expected in line for line in report), expected
    assert not any("push_to_hub" in line for line in report)  # known now: off, so no upload (hub.repo_id unset)

    # secrets reach neither the job file nor the terminal
    for secret in (HF_TOKEN, AWS_SECRET):
        assert secret not in text and secret not in run.stdout and secret not in run.stderr
    assert not [p.name for p in out.parent.iterdir() if p.name != "sd35.yaml"]  # the temp file was renamed


def test_both_key_styles_convert_the_same(tmp_path):
    plain = {k.lstrip("-"): v for k, v in QUICKSTART.items()}
    dashed = {f"--{k}": v for k, v in plain.items()}
    a = convert_simpletuner(*write_setup(tmp_path / "plain", plain))
    b = convert_simpletuner(*write_setup(tmp_path / "dashed", dashed))
    assert a.job == b.job and a.job["validation"]["guidance"] == 4.0
    assert a.report() == [line.replace("/dashed/", "/plain/") for line in b.report()]


def test_legacy_names_and_a_repeated_key(tmp_path):
    config = minimal(flux_schedule_shift=1.0, validation_steps=100, validation_guidance=3.0,
                     **{"--validation_guidance": 5.0})
    conv = convert_simpletuner(*write_setup(tmp_path, config, ONE_SQUARE_SET))
    assert (conv.job["flow"]["shift"], conv.job["validation"]["every_steps"]) == (1.0, 100)
    assert conv.job["validation"]["guidance"] == 5.0  # the later value counts, as in SimpleTuner
    assert any(line.startswith("ignored: validation_guidance = 3.0 (set again") for line in conv.report())


def test_a_setup_that_sets_everything_lists_nothing(tmp_path):
    """Every setting SimpleTuner would default, set explicitly to a value we train: nothing to report."""
    config = minimal(**{**SIMPLETUNER_DEFAULTS, "model_type": "lora", "num_train_epochs": 0, "max_train_steps": 500,
                        "seed": 7})
    conv = convert_simpletuner(*write_setup(tmp_path, config, ONE_SQUARE_SET))
    assert conv.report() == []
    assert conv.job["data"]["datasets"] == [{"id": "photos", "type": "local", "instance_data_dir": "/data/photos",
                                             "caption_strategy": "textfile", "resolution": 1024,
                                             "resolution_type": "pixel", "crop": True, "crop_style": "center",
                                             "crop_aspect": "square"}]


@pytest.mark.parametrize(("theirs", "ours", "beta2", "decay"), [
    ("optimi-stableadamw", "stableadamw", 0.99, 1e-2), ("optimi-lion", "lion", 0.99, 0.0),
    ("bnb-adamw8bit", "adamw8bit", 0.999, 1e-2), ("bnb-lion8bit-paged", "lion8bit_paged", 0.99, 0.0),
    ("bnb-adamw8bit-paged", "adamw8bit_paged", 0.999, 1e-2), ("bnb-adamw-paged", "adamw", 0.999, 1e-2),
    ("torch-adamw", "adamw", 0.999, 1e-2)])
def test_optimizers_are_translated_with_their_defaults(tmp_path, theirs, ours, beta2, decay):
    conv = convert_simpletuner(*write_setup(tmp_path, minimal(optimizer=theirs), ONE_SQUARE_SET))
    train = load_job(raw=conv.job).train
    assert (train.optimizer, train.adam_beta2, train.weight_decay) == (ours, beta2, decay)


def test_the_lowest_vram_setup_converts_whole(tmp_path):
    """The guide's lowest-VRAM settings (nf4-bnb base, bnb-lion8bit-paged) have exact equivalents now."""
    config = minimal(base_model_precision="nf4-bnb", optimizer="bnb-lion8bit-paged", train_batch_size=1)
    conv = convert_simpletuner(*write_setup(tmp_path, config, ONE_SQUARE_SET))
    job = load_job(raw=conv.job)
    assert (job.model.quantize, job.train.optimizer, job.train.batch_size) == ("nf4", "lion8bit_paged", 1)
    assert not any("base_model_precision" in line or "paged" in line for line in conv.report())


def test_hub_settings_convert(tmp_path):
    conv = convert_simpletuner(*write_setup(tmp_path, minimal(push_to_hub=True, hub_model_id="me/sd35-fox",
                                                              model_card_private=False), ONE_SQUARE_SET))
    hub = load_job(raw=conv.job).hub
    assert (hub.repo_id, hub.private) == ("me/sd35-fox", False)
    off = convert_simpletuner(*write_setup(tmp_path / "off", minimal(push_to_hub=False, hub_model_id="me/x"),
                                           ONE_SQUARE_SET))
    assert load_job(raw=off.job).hub.repo_id is None
    bare = convert_simpletuner(*write_setup(tmp_path / "bare", minimal(push_to_hub="true"), ONE_SQUARE_SET))
    assert load_job(raw=bare.job).hub.repo_id is None
    assert any("not converted: push_to_hub" in line and "hub.repo_id" in line for line in bare.report())


def test_optimizer_config_overrides_and_unknown_values_are_listed(tmp_path):
    config = minimal(optimizer="prodigy", optimizer_config="eps=1e-7,weight_decay=0.0,d_coef=2", lr_scheduler="cosine",
                     base_model_precision="int8-torchao", flow_schedule_shift=0, validation_resolution="1000x1000")
    conv = convert_simpletuner(*write_setup(tmp_path, config, ONE_SQUARE_SET))
    job = load_job(raw=conv.job)
    assert (job.train.adam_epsilon, job.train.weight_decay, job.train.lr_scheduler) == (1e-7, 0.0, "cosine")
    assert (job.train.optimizer, job.model.quantize, job.flow.shift) == ("adamw", "none", 1.0)  # our defaults
    report = "\n".join(conv.report())
    assert job.validation.resolution == "1024x1024"  # ours: 1000 is no multiple of 16
    for key in ('optimizer = "prodigy"', "optimizer_config.d_coef", 'base_model_precision = "int8-torchao"',
                'validation_resolution = "1000x1000" (cannot use the value: resolution 1000x1000: both sides'):
        assert f"not converted: {key}" in report


def test_buckets_and_data_set_weights_convert(tmp_path):
    backends = [{"id": "photos", "instance_data_dir": "/data/photos"},  # SimpleTuner's defaults: aspect buckets
                {"id": "mp", "instance_data_dir": "/data/mp", "resolution": 1.0, "resolution_type": "area",
                 "minimum_image_size": 0.25, "crop": True, "crop_style": "face", "crop_aspect": "closest",
                 "crop_aspect_buckets": [0.75, 1.0, 1.5]},
                {"id": "reg", "instance_data_dir": "/data/reg", "is_regularisation_data": True, "repeats": 2,
                 "probability": 0.5}]
    with pytest.raises(ConvertError, match=r"refused, nothing written:\n  .*multidatabackend.json\[mp\].crop_style = "
                                           r'"face" \(no face detection here'):
        convert_simpletuner(*write_setup(tmp_path / "strict", minimal(), backends))
    conv = convert_simpletuner(*write_setup(tmp_path, minimal(aspect_bucket_alignment=32), backends), lossy=True)
    job = load_job(raw=conv.job)
    photos, mp, reg = job.data.datasets
    assert (photos.caption_strategy, photos.resolution_type, photos.crop) == ("filename", "pixel_area", False)
    assert (mp.resolution, mp.resolution_type, mp.minimum_image_size) == (1000, "pixel_area", 500)  # megapixels
    assert (mp.crop, mp.crop_aspect, mp.crop_aspect_buckets) == (True, "closest", [0.75, 1.0, 1.5])
    assert (reg.is_regularisation_data, reg.repeats, job.data.bucket_alignment) == (True, 2, 64)  # forced for SD3
    report = "\n".join(conv.report())
    assert "ignored: aspect_bucket_alignment = 32 (SimpleTuner's SD3 model forces 64" in report
    assert 'multidatabackend.json[mp].crop_style = "face" (no face detection here' in report
    assert f"lost: {tmp_path}/simpletuner/config/multidatabackend.json[reg].probability = 0.5" in report
    assert "crop_style = \"random\", SimpleTuner's default" not in report  # it only matters when SimpleTuner crops


def test_secrets_in_any_key_never_reach_the_output(tmp_path):
    config = minimal(**{"--wandb_api_key": "0123456789abcdef0123456789abcdef01234567",
                        "webhook_config": {"webhook_url": "https://discord.example/api/webhooks/1/s3cr3t"},
                        "odd_setting": f"token {HF_TOKEN}"})
    cfg, mdb = write_setup(tmp_path, config, ONE_SQUARE_SET)
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out)]) == 0
    text = out.read_text()
    for secret in ("0123456789abcdef0123456789abcdef01234567", "s3cr3t", HF_TOKEN):
        assert secret not in text
    for key in ("wandb_api_key", "webhook_config", "odd_setting"):
        assert f"# dropped secret: {key} (" in text


@pytest.mark.parametrize(("which", "content", "message"), [
    ("config", '{"model_family": "sd3",', "neither JSON (line 1"),
    ("config", '["model_family"]', "not a SimpleTuner config"),
    ("config", '{"learning_rate": 1e-4}', "not a SimpleTuner config (it sets none of model_family"),
    ("config", '{"model_family": "flux", "pretrained_model_name_or_path": "x"}', "model_family: 'flux' is not"),
    ("backends", '{"id": "photos"}', "not a SimpleTuner multidatabackend.json"),
    ("backends", '[{"id": "embeds", "dataset_type": "text_embeds"}]', "no enabled image data set"),
])
def test_bad_input_exits_2_naming_the_file(tmp_path, capsys, which, content, message):
    cfg, mdb = write_setup(tmp_path, minimal(), ONE_SQUARE_SET)
    bad = cfg if which == "config" else mdb
    bad.write_text(content)
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {bad}: " in err and message in err
    assert not out.exists()


def test_missing_file_and_an_invalid_result_exit_2(tmp_path, capsys):
    cfg, mdb = write_setup(tmp_path, minimal(max_train_steps=100, lr_warmup_steps=100), ONE_SQUARE_SET)
    assert main(["simpletuner", str(tmp_path / "nope.json"), str(mdb), "-o", str(tmp_path / "a.yaml")]) == 2
    assert f"{tmp_path / 'nope.json'}: cannot read it" in capsys.readouterr().err
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(tmp_path / "b.yaml")]) == 2
    err = capsys.readouterr().err
    assert "the converted job is not valid" in err and "lr_warmup_steps" in err
    with pytest.raises(ConvertError, match="not valid"):
        convert_simpletuner(cfg, mdb)
    assert not list(tmp_path.glob("*.yaml"))


def test_an_existing_job_is_replaced_only_with_force(tmp_path, capsys):
    cfg, mdb = write_setup(tmp_path, minimal(), ONE_SQUARE_SET)
    out = tmp_path / "job.yaml"
    out.write_text("mine: true\n")
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err and out.read_text() == "mine: true\n"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out), "--force"]) == 0
    assert load_job(out).model.pretrained == "/models/sd35"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml", "simpletuner"]
