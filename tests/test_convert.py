"""raytune_sd3.convert: SimpleTuner's config.json + multidatabackend.json -> a job YAML that loads, with every setting
we do not convert listed and no secret copied. Real files in tmp_path; no Ray, no models."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raytune_sd3.config import load_job
from raytune_sd3.convert import ConvertError, convert_simpletuner
from raytune_sd3.convert.__main__ import main
from raytune_sd3.convert.config_keys import SIMPLETUNER_DEFAULTS

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


def test_prodigy_converts_with_its_settings_at_simpletuners_lr(tmp_path):
    """SimpleTuner's prodigy runs at lr 1.0 whatever learning_rate says (its default settings win), with betas
    (0.9, 0.99) and no weight decay; its optimizer_config's d_coef, safeguard_warmup and use_bias_correction are
    train.prodigy's. What differs (prodigy-plus-schedule-free there) is said."""
    config = minimal(optimizer="prodigy", learning_rate=1e-4, lr_scheduler="cosine",
                     optimizer_config="d_coef=0.5,safeguard_warmup=true,use_bias_correction=True,beta3=0.9")
    conv = convert_simpletuner(*write_setup(tmp_path, config, ONE_SQUARE_SET))
    t = load_job(raw=conv.job).train
    assert (t.optimizer, t.learning_rate, t.adam_beta1, t.adam_beta2, t.weight_decay, t.adam_epsilon) == (
        "prodigy", 1.0, 0.9, 0.99, 0.0, 1e-8)
    assert (t.prodigy.d_coef, t.prodigy.safeguard_warmup, t.prodigy.use_bias_correction) == (0.5, True, True)
    assert t.lr_scheduler == "cosine"  # Prodigy takes a schedule
    report = "\n".join(conv.report())
    assert "prodigy-plus-schedule-free" in report and "learning_rate 0.0001: SimpleTuner runs prodigy at lr 1.0" in report
    assert "not converted: optimizer_config.beta3" in report


@pytest.mark.parametrize(("theirs", "eps", "decay"), [("adamw_schedulefree", 1e-8, 1e-2),
                                                      ("adamw_schedulefree+aggressive", 1e-6, 1e-3),
                                                      ("adamw_schedulefree+no_kahan", 1e-6, 1e-3)])
def test_schedule_free_converts_and_replaces_the_schedule_as_simpletuner_does(tmp_path, theirs, eps, decay):
    config = minimal(optimizer=theirs, lr_scheduler="cosine", lr_warmup_steps=20, learning_rate=1e-3)
    conv = convert_simpletuner(*write_setup(tmp_path, config, ONE_SQUARE_SET))
    t = load_job(raw=conv.job).train
    assert (t.optimizer, t.adam_epsilon, t.weight_decay, t.learning_rate) == ("adamw_schedulefree", eps, decay, 1e-3)
    assert (t.lr_scheduler, t.lr_warmup_steps) == ("constant", 20)  # the warmup is the optimizer's own
    assert any("lr_scheduler cosine: SimpleTuner replaces it" in line for line in conv.report())


def test_the_polynomial_schedule_converts_with_simpletuners_power(tmp_path):
    t = load_job(raw=convert_simpletuner(*write_setup(tmp_path, minimal(lr_scheduler="polynomial"),
                                                      ONE_SQUARE_SET)).job).train
    assert (t.lr_scheduler, t.lr_power) == ("polynomial", 0.8)  # SimpleTuner's lr_power default
    conv = convert_simpletuner(*write_setup(tmp_path / "2", minimal(lr_scheduler="polynomial", lr_power=2,
                                                                    lr_end=1e-7), ONE_SQUARE_SET))
    assert load_job(raw=conv.job).train.lr_power == 2.0
    assert not any("lr_end" in line for line in conv.report())  # 1e-7 is where ours ends too
    conv = convert_simpletuner(*write_setup(tmp_path / "3", minimal(lr_scheduler="polynomial"), ONE_SQUARE_SET))
    assert any("lr_end 4e-07: the polynomial schedule here ends at 1e-07" in line for line in conv.report())
    restarts = convert_simpletuner(*write_setup(tmp_path / "4", minimal(lr_scheduler="cosine_with_restarts",
                                                                       lr_power=2), ONE_SQUARE_SET))
    report = "\n".join(restarts.report())
    assert "not converted: lr_scheduler = \"cosine_with_restarts\"" in report and "ignored: lr_power" in report


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
    config = minimal(optimizer="soap", optimizer_config="eps=1e-7,weight_decay=0.0,d_coef=2", lr_scheduler="cosine",
                     base_model_precision="int8-torchao", flow_schedule_shift=0, validation_resolution="1000x1000")
    conv = convert_simpletuner(*write_setup(tmp_path, config, ONE_SQUARE_SET))
    job = load_job(raw=conv.job)
    assert (job.train.adam_epsilon, job.train.weight_decay, job.train.lr_scheduler) == (1e-7, 0.0, "cosine")
    assert (job.train.optimizer, job.model.quantize, job.flow.shift) == ("adamw", "none", 1.0)  # our defaults
    report = "\n".join(conv.report())
    assert job.validation.resolution == "1024x1024"  # ours: 1000 is no multiple of 16
    for key in ('optimizer = "soap"', "optimizer_config.d_coef", 'base_model_precision = "int8-torchao"',
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


# --- SimpleTuner's SD3 quickstart as printed (tests/data/simpletuner), end to end ------------------------------------

DATA = ROOT / "tests" / "data" / "simpletuner"


def test_the_quickstart_as_printed_converts_and_fits_an_h100(tmp_path, capsys):
    """The quickstart's config.json sets 8 keys: everything else is SimpleTuner's default, and gradient
    checkpointing (on by default there) is what makes SD3.5 Large fit an 80 GB card (89 GiB without it)."""
    out = tmp_path / "quickstart.yaml"
    assert main(["simpletuner", str(DATA / "sd3-quickstart.config.json"),
                 str(DATA / "sd3-quickstart.multidatabackend.json"), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    job = load_job(out)
    t = job.train
    assert (t.gradient_checkpointing, t.max_grad_norm, t.grad_clip, t.optimizer, t.mixed_precision) == (
        True, 2.0, "value", "adamw_bf16", "bf16")
    assert (job.lora.dropout, job.lora.dtype, job.lora.rank, job.model.dtype) == (0.1, "bf16", 16, "bf16")
    assert (t.learning_rate, t.checkpoint_every, t.keep_checkpoints, t.num_workers) == (4e-7, 500, 5, 1)
    assert (job.validation.guidance, job.validation.every_steps, job.validation.steps) == (3.0, 100, 30)
    assert (job.text.t5_max_length, job.data.bucket_alignment) == (154, 64)
    assert "default: gradient_checkpointing = true -> train.gradient_checkpointing = true" in printed
    assert "not converted: num_train_epochs = 1" in printed  # its images are not on this machine to count

    from raytune_sd3.check import main as check_main
    assert check_main([str(out), "--gpu", "H100-80GB", "--skip-paths"]) == 0
    assert "[ok]   memory   fits:" in capsys.readouterr().out


def test_one_epoch_is_counted_in_steps_where_the_images_are(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):
        (photos / f"p{i}.png").write_bytes(b"")  # counted by name only
    backends = [{"id": "photos", "instance_data_dir": str(photos), "repeats": 1}]
    one = convert_simpletuner(*write_setup(tmp_path / "one", minimal(), backends))
    assert one.job["train"]["max_steps"] == 5  # 10 images x 2 (repeats 1) / batch 4 -> 5 steps
    two = convert_simpletuner(*write_setup(tmp_path / "two", minimal(num_train_epochs=2, train_batch_size=2,
                                                                     gradient_accumulation_steps=2), backends))
    assert two.job["train"]["max_steps"] == 10
    assert any("num_train_epochs = 2: 20 images per epoch" in line for line in two.report())


def test_settings_left_out_take_simpletuners_defaults(tmp_path):
    conv = convert_simpletuner(*write_setup(tmp_path, minimal(max_train_steps=1000), ONE_SQUARE_SET))
    job = load_job(raw=conv.job)
    assert (job.validation.resolution, job.validation.guidance, job.flow.shift) == ("256", 7.5, 3.0)
    assert (job.train.lr_scheduler, job.train.lr_warmup_steps, job.train.adam_epsilon) == ("constant", 0, 1e-6)
    defaults = [line for line in conv.report() if line.startswith("default: ")]
    assert 'default: grad_clip_method = "value" -> train.grad_clip = "value"' in defaults
    assert len(defaults) == len(SIMPLETUNER_DEFAULTS) - 2  # all but model_type (set) and num_train_epochs (steps set)


# --- every form SimpleTuner reads ----------------------------------------------------------------------------------

FORM_CONFIG = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/models/sd35",
               "output_dir": "/out", "max_train_steps": 300, "learning_rate": 1e-5, "lora_rank": 8,
               "tokenizer_max_length": 77, "gradient_checkpointing": False}
FORM_ENV = """# SimpleTuner config.env
export MODEL_TYPE='lora'
MODEL_FAMILY="sd3"
export MODEL_NAME="/models/sd35"
OUTPUT_DIR=/out
MAX_NUM_STEPS=300
LEARNING_RATE=1e-5
export TRAINER_EXTRA_ARGS="--lora_rank=8 --gradient_checkpointing=false"
export TRAINER_EXTRA_ARGS="${TRAINER_EXTRA_ARGS} --tokenizer_max_length 77"
SOMETHING_ELSE=1
"""


def _forms(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    toml_lines = [f"{k} = {json.dumps(v)}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}"
                  for k, v in FORM_CONFIG.items()]
    files = {"config.json": json.dumps(FORM_CONFIG),
             "dashed.json": json.dumps({f"--{k}": v for k, v in FORM_CONFIG.items()}),
             "config.toml": "\n".join(toml_lines) + "\n",
             "config.env": FORM_ENV,
             "wrapped.json": json.dumps({"_metadata": {"name": "mine"}, "config": {f"--{k}": v for k, v in
                                                                                   FORM_CONFIG.items()}}),
             "flat.json": json.dumps({"_metadata": {"name": "mine"}, **FORM_CONFIG})}
    for name, text in files.items():
        (folder / name).write_text(text)
    return {name: folder / name for name in files}


def test_every_config_form_converts_to_the_same_job(tmp_path):
    forms = _forms(tmp_path / "forms")
    backends = tmp_path / "multidatabackend.json"
    backends.write_text(json.dumps({"_metadata": {"name": "data"}, "datasets": ONE_SQUARE_SET}))  # the web UI's
    jobs = {name: convert_simpletuner(path, backends) for name, path in forms.items()}
    reference = jobs["config.json"].job
    assert (reference["train"]["max_steps"], reference["lora"]["rank"], reference["text"]["t5_max_length"]) == (
        300, 8, 77)
    assert reference["train"]["gradient_checkpointing"] is False
    for name, conv in jobs.items():
        assert conv.job == reference, name
    assert "ignored: SOMETHING_ELSE (SimpleTuner's config.env loader does not read it)" in jobs["config.env"].report()


def test_the_string_false_keeps_simpletuners_default_as_its_loaders_do(tmp_path):
    """SimpleTuner passes no argument for "false" written as a string (every config.env value is one), so
    gradient checkpointing stays on there: the job must checkpoint too."""
    json_config, backends = write_setup(tmp_path, minimal(gradient_checkpointing="false"), ONE_SQUARE_SET)
    env = tmp_path / "config.env"
    env.write_text(FORM_ENV.replace("--gradient_checkpointing=false", "") + "USE_GRADIENT_CHECKPOINTING=false\n")
    for config in (env, json_config):
        conv = convert_simpletuner(config, backends)
        assert conv.job["train"]["gradient_checkpointing"] is True, config
        assert any(line.startswith('ignored: gradient_checkpointing = "false" (SimpleTuner passes nothing')
                   for line in conv.report())


def test_every_data_loader_form_converts_to_the_same_data_sets(tmp_path):
    cfg, plain = write_setup(tmp_path, minimal(max_train_steps=100), ONE_SQUARE_SET)
    wrapped, toml = tmp_path / "wrapped.json", tmp_path / "multidatabackend.toml"
    wrapped.write_text(json.dumps({"_metadata": {"name": "data"}, "datasets": ONE_SQUARE_SET}))
    toml.write_text('[[datasets]]\nid = "photos"\ntype = "local"\ninstance_data_dir = "/data/photos"\n'
                    'caption_strategy = "textfile"\nresolution = 1024\nresolution_type = "pixel"\ncrop = true\n'
                    'crop_style = "center"\n')
    jobs = [convert_simpletuner(cfg, backends).job for backends in (plain, wrapped, toml)]
    assert jobs[0]["data"]["datasets"][0]["instance_data_dir"] == "/data/photos"
    assert jobs[0] == jobs[1] == jobs[2]


def test_a_config_in_no_form_exits_2_naming_the_file(tmp_path, capsys):
    cfg, mdb = write_setup(tmp_path, minimal(), ONE_SQUARE_SET)
    cfg.write_text("model_family: sd3\nthis is yaml, not a SimpleTuner config\n")
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"error: {cfg}: neither JSON" in err and "nor TOML nor KEY=value env lines" in err
    assert not (tmp_path / "job.yaml").exists()


# --- refusals: what would train something else ----------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "message"), [
    ({"controlnet": True}, 'controlnet = true (raytune_sd3 trains no ControlNet'),
    ({"twinflow_enabled": "true"}, 'twinflow_enabled = "true" (raytune_sd3 trains no TwinFlow'),
    ({"distillation_method": "dmd"}, 'distillation_method = "dmd" (raytune_sd3 trains no distilled model'),
    ({"model_type": "embedding"}, "model_type 'embedding': raytune_sd3 trains LoRA on SD3 only"),
    ({"base_model_precision": "fp8-quanto"}, "does not train SD3 with fp8-quanto either"),
])
def test_what_we_never_train_is_refused_even_when_lossy(tmp_path, capsys, setting, message):
    cfg, mdb = write_setup(tmp_path, minimal(**setting), ONE_SQUARE_SET)
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out), "--lossy"]) == 2
    err = capsys.readouterr().err
    assert f"refused, nothing written:\n  {cfg}: " in err and message in err and "--lossy" not in err
    assert not out.exists()


@pytest.mark.parametrize(("setting", "key"), [
    ({"lora_type": "lycoris"}, 'lora_type = "lycoris"'), ({"loss_type": "huber"}, 'loss_type = "huber"'),
    ({"snr_gamma": 5}, "snr_gamma = 5"), ({"model_type": None}, "model_type = \"full\", SimpleTuner's default"),
])
def test_what_changes_training_is_refused_unless_lossy(tmp_path, capsys, setting, key):
    config = {k: v for k, v in minimal(**setting).items() if v is not None}
    cfg, mdb = write_setup(tmp_path, config, ONE_SQUARE_SET)
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"  {cfg}: {key} (" in err and "pass --lossy" in err and not out.exists()
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out), "--lossy"]) == 0
    assert f"# lost: {cfg}: {key} (" in out.read_text()


@pytest.mark.parametrize(("entry", "message"), [
    ({"id": "s3-photos", "type": "aws", "aws_secret_access_key": AWS_SECRET},
     "[s3-photos] type aws has no aws_bucket_name"),
    ({"id": "hub-photos", "type": "huggingface", "split": "train"},
     "[hub-photos] type huggingface has no dataset_name"),
    ({"id": "web", "type": "csv", "csv_file": "/data/urls.csv"},
     "[web] type csv: raytune_sd3 reads folders (local, mounted or in S3/GCS), Parquet files, Hugging Face data sets "
     "and WebDataset shards"),
    ({"id": "shards", "type": "webshart", "source": "someone/shards", "caption_strategy": "webshart"},
     "[shards] type webshart source someone/shards is a hub data set, which webshart downloads while training: "
     "download its shards first (hf download --repo-type dataset someone/shards --local-dir DIR)"),
    ({"id": "edges", "instance_data_dir": "/data/edges", "conditioning": [{"type": "canny"}]},
     "multidatabackend.json[edges].conditioning = [{\"type\": \"canny\"}] (conditioning data are for ControlNet"),
    ({"id": "clips", "dataset_type": "video", "instance_data_dir": "/data/clips"},
     "[clips] dataset_type video: raytune_sd3 trains on images only"),
    ({"id": "mp", "instance_data_dir": "/data/mp", "crop": True, "crop_aspect": "closest"},
     "crop_aspect closest needs crop_aspect_buckets (SimpleTuner refuses it too)"),
])
def test_data_we_cannot_read_is_refused_naming_the_entry(tmp_path, capsys, entry, message):
    cfg, mdb = write_setup(tmp_path, minimal(), [*ONE_SQUARE_SET, entry])
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out), "--lossy"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "simpletuner" / "config" / "multidatabackend.json") in err and message in err, err
    assert AWS_SECRET not in err and not out.exists()


def test_aws_huggingface_and_webshart_data_sets_become_a_bucket_folder_a_table_and_shards(tmp_path):
    """SimpleTuner's remote kinds (both of its SD3 examples use huggingface; webshart reads WebDataset tar shards)
    map onto ours; the bucket's credentials and the hub token stay out of the job (the environment gives them)."""
    backends = [
        {"id": "s3-photos", "type": "aws", "aws_bucket_name": "photos", "aws_data_prefix": "set/one/",
         "aws_endpoint_url": "http://minio:9000", "aws_region_name": "eu-west-1",
         "aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "aws_secret_access_key": AWS_SECRET,
         "caption_strategy": "textfile", "resolution": 512},
        {"id": "hub", "type": "huggingface", "dataset_name": "bghira/pseudo-camera-10k", "split": "train",
         "caption_strategy": "huggingface", "metadata_backend": "huggingface", "image_column": "png",
         "caption_column": "text", "resolution": 512},
        {"id": "shards", "type": "webshart", "source": "/data/wds", "subfolder": "train", "metadata":
         "/data/wds-index", "caption_strategy": "webshart", "metadata_backend": "webshart", "resolution": 512,
         "webshart": {"shard_cache_gb": 10, "hf_token": "not-for-the-job-1234"}}]
    cfg, mdb = write_setup(tmp_path, minimal(), backends)
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out)]) == 0
    s3, hub, shards = load_job(out).data.datasets
    assert (shards.type, shards.urls, shards.caption_strategy, shards.caption_key, shards.image_key) == (
        "webdataset", "/data/wds/train", "textfile", "txt", "jpg;jpeg;png;webp")
    assert (s3.type, s3.instance_data_dir) == (
        "local", "s3://photos/set/one?endpoint_override=minio:9000&scheme=http&region=eu-west-1")
    assert (hub.type, hub.dataset, hub.split, hub.image_column, hub.caption_column) == (
        "huggingface", "bghira/pseudo-camera-10k", "train", "png", "text")
    text = out.read_text()
    assert AWS_SECRET not in text and "AKIAIOSFODNN7EXAMPLE" not in text and "not-for-the-job-1234" not in text
    assert "hf download --repo-type dataset bghira/pseudo-camera-10k" in text
    assert "webshart.shard_cache_gb = 10" in text and "metadata = \"/data/wds-index\"" in text


# --- one SimpleTuner setting at a time: the exact value in the job ---------------------------------------------------

BARE_SET = [{"id": "photos", "instance_data_dir": "/data/photos"}]
ONE_SETTING = [
    ("pretrained_model_name_or_path", "/models/other", "model.pretrained", "/models/other"),
    ("revision", "refs/pr/1", "model.revision", "refs/pr/1"),
    ("mixed_precision", "no", "train.mixed_precision", "no"),
    ("mixed_precision", "no", "model.dtype", "fp32"),
    ("base_model_precision", "int8-quanto", "model.quantize", "int8"),
    ("base_model_precision", "nf4-bnb", "model.quantize", "nf4"),
    ("lora_rank", 8, "lora.rank", 8),
    ("lora_alpha", 4, "lora.alpha", 4.0),
    ("lora_dropout", 0.05, "lora.dropout", 0.05),
    ("peft_lora_target_modules", ["to_q", "to_k"], "lora.targets", ["to_q", "to_k"]),
    ("tokenizer_max_length", 77, "text.t5_max_length", 77),
    ("tokenizer_max_length", 300, "text.t5_max_length", 154),
    ("t5_padding", "zero", "text.t5_padding", "zero"),
    ("sd3_clip_uncond_behaviour", "zero", "text.uncond", "zero"),
    ("caption_dropout_probability", 0.2, "data.caption_dropout", 0.2),
    ("vae_batch_size", 2, "data.encode_batch_size", 2),
    ("aspect_bucket_alignment", 32, "data.bucket_alignment", 64),
    ("flow_schedule_shift", 1.0, "flow.shift", 1.0),
    ("flow_schedule_auto_shift", True, "flow.shift", "auto"),
    ("flow_use_uniform_schedule", True, "flow.sigma_sampling", "uniform"),
    ("flow_sigmoid_scale", 0.8, "flow.logit_std", 0.8),
    ("flow_matching_loss", "diffusers", "flow.prediction", "x0"),
    ("output_dir", "/elsewhere", "output_dir", "/elsewhere"),
    ("num_processes", 4, "train.num_workers", 4),
    ("train_batch_size", 2, "train.batch_size", 2),
    ("gradient_accumulation_steps", 3, "train.grad_accum", 3),
    ("max_train_steps", 1234, "train.max_steps", 1234),
    ("learning_rate", 1e-5, "train.learning_rate", 1e-5),
    ("lr_scheduler", "cosine", "train.lr_scheduler", "cosine"),
    ("lr_warmup_steps", 10, "train.lr_warmup_steps", 10),
    ("optimizer", "optimi-lion", "train.optimizer", "lion"),
    ("optimizer_config", "eps=1e-7", "train.adam_epsilon", 1e-7),
    ("optimizer_beta1", 0.8, "train.adam_beta1", 0.8),
    ("optimizer_beta2", 0.95, "train.adam_beta2", 0.95),
    ("max_grad_norm", 0.5, "train.max_grad_norm", 0.5),
    ("max_grad_norm", 0, "train.max_grad_norm", None),
    ("grad_clip_method", "norm", "train.grad_clip", "norm"),
    ("gradient_checkpointing", False, "train.gradient_checkpointing", False),
    ("seed", 42, "train.seed", 42),
    ("checkpoint_step_interval", 250, "train.checkpoint_every", 250),
    ("checkpointing_steps", 300, "train.checkpoint_every", 300),
    ("checkpoints_total_limit", 3, "train.keep_checkpoints", 3),
    ("validation_prompt", "a fox", "validation.prompts", ["a fox"]),
    ("validation_step_interval", 50, "validation.every_steps", 50),
    ("validation_resolution", "768x768,1024x512", "validation.resolution", "768x768,1024x512"),
    ("validation_guidance", 5.0, "validation.guidance", 5.0),
    ("validation_num_inference_steps", 20, "validation.steps", 20),
    ("validation_seed", 9, "validation.seed", 9),
    ("validation_guidance_skip_layers", "[7, 8]", "validation.skip_layers", [7, 8]),
    ("validation_guidance_skip_layers_start", 0.1, "validation.skip_layer_start", 0.1),
    ("validation_guidance_skip_layers_stop", 0.3, "validation.skip_layer_stop", 0.3),
    ("validation_guidance_skip_scale", 3.0, "validation.skip_layer_scale", 3.0),
    ("num_validation_images", 3, "validation.num_images", 3),
    ("validation_negative_prompt", "blurry, cropped", "validation.negative_prompt", "blurry, cropped"),
    ("use_ema", True, "train.ema_decay", 0.995),
    ("use_ema", False, "train.ema_decay", None),
    ("report_to", "wandb", "wandb.project", "simpletuner"),
    ("model_card_private", False, "hub.private", False),
    ("resolution", 512, "data.datasets.0.resolution", 512),
    ("resolution_type", "pixel", "data.datasets.0.resolution_type", "pixel"),
    ("caption_strategy", "textfile", "data.datasets.0.caption_strategy", "textfile"),
    ("minimum_image_size", 256, "data.datasets.0.minimum_image_size", 256),
]


@pytest.mark.parametrize(("option", "value", "ours", "expected"), ONE_SETTING,
                         ids=[f"{o}={v}" for o, v, _, _ in ONE_SETTING])
def test_one_setting_converts_to_its_exact_value(tmp_path, option, value, ours, expected):
    config = {"model_type": "lora", "model_family": "sd3", "pretrained_model_name_or_path": "/models/sd35",
              "max_train_steps": 2000, option: value}
    got = load_job(raw=convert_simpletuner(*write_setup(tmp_path, config, BARE_SET)).job).model_dump(mode="json")
    for part in ours.split("."):
        got = got[int(part)] if isinstance(got, list) else got[part]
    assert got == expected


def test_dora_and_init_lora_are_converted(tmp_path):
    """use_dora trains a DoRA (lora.kind dora); init_lora starts from that file (lora.init_from)."""
    start = tmp_path / "start.safetensors"
    cfg, mdb = write_setup(tmp_path, minimal(use_dora="true", init_lora=str(start)), ONE_SQUARE_SET)
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out)]) == 0
    job = load_job(out)
    assert job.lora.kind == "dora" and job.lora.init_from == start
    cfg, mdb = write_setup(tmp_path / "plain", minimal(use_dora=False), ONE_SQUARE_SET)
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(tmp_path / "plain.yaml")]) == 0
    assert load_job(tmp_path / "plain.yaml").lora.kind == "lora"


@pytest.mark.parametrize(("lycoris", "lora", "lost"), [
    # SimpleTuner's LoKr example: whole factors, so its linear_dim 10000 and alpha are not a rank
    ({"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 16, "full_matrix": True,
      "apply_preset": {"target_module": ["Attention", "FeedForward"]}},
     {"kind": "lokr", "rank": 16, "alpha": None, "targets": "all", "lycoris": {"factor": 16, "full_matrix": True}}, ""),
    # its LoHa default: per-class factors are LoKr's, ignored
    ({"algo": "loha", "multiplier": 1.0, "linear_dim": 32, "linear_alpha": 16,
      "apply_preset": {"target_module": ["Attention"]}},
     {"kind": "loha", "rank": 32, "alpha": 16.0, "targets": "attention+context", "lycoris": None}, ""),
    # one factor per module class, the same for both: it is the factor
    ({"algo": "lokr", "linear_dim": 8, "linear_alpha": 8, "apply_preset": {
        "target_module": ["Attention", "FeedForward"], "module_algo_map": {"Attention": {"factor": 8},
                                                                           "FeedForward": {"factor": 8}}}},
     {"kind": "lokr", "rank": 8, "alpha": 8.0, "targets": "all", "lycoris": {"factor": 8, "full_matrix": False}}, ""),
    # different ones are lost (refused unless --lossy)
    ({"algo": "lokr", "linear_dim": 8, "apply_preset": {"target_module": ["Attention", "FeedForward"],
                                                        "module_algo_map": {"Attention": {"factor": 16},
                                                                            "FeedForward": {"factor": 8}}}},
     {"kind": "lokr", "targets": "all", "lycoris": {"factor": -1, "full_matrix": False}}, "one factor for every"),
])
def test_lycoris_config_becomes_lora_kind_and_lycoris(tmp_path, capsys, lycoris, lora, lost):
    """lora_type lycoris + its lycoris_config JSON (read from SimpleTuner's folder, as SimpleTuner does)."""
    cfg, mdb = write_setup(tmp_path, minimal(lora_type="lycoris", lycoris_config="config/lycoris_config.json",
                                             lora_rank=4, lora_dropout=0.1), ONE_SQUARE_SET)
    (cfg.parent / "lycoris_config.json").write_text(json.dumps(lycoris))
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out)]) == (2 if lost else 0)
    if lost:
        assert lost in capsys.readouterr().err and not out.exists()
        assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out), "--lossy"]) == 0
    got = load_job(out).lora.model_dump(mode="json")
    assert {k: got[k] for k in lora} == lora


@pytest.mark.parametrize(("settings", "message"), [
    ({"lora_type": "lycoris"}, "lora_type lycoris without lycoris_config"),
    ({"lora_type": "lycoris", "lycoris_config": "/nowhere/lycoris.json"}, "is not a file here"),
])
def test_lycoris_without_its_config_is_refused(tmp_path, capsys, settings, message):
    cfg, mdb = write_setup(tmp_path, minimal(**settings), ONE_SQUARE_SET)
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(tmp_path / "job.yaml")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("settings", "decay", "use_ema", "listed"), [
    ({"use_ema": True, "ema_decay": 0.99, "ema_validation": "ema_only", "ema_device": "cpu"}, 0.99, True,
     "ema_device"),
    ({"use_ema": True, "ema_validation": "comparison", "ema_update_interval": 1}, 0.995, False,
     "ema_validation comparison"),
    ({"use_ema": False, "ema_decay": 0.9, "ema_validation": "ema_only"}, None, False, "only read with use_ema on"),
])
def test_simpletuners_ema_becomes_ours(tmp_path, settings, decay, use_ema, listed):
    conv = convert_simpletuner(*write_setup(tmp_path, minimal(**settings), BARE_SET))
    job = load_job(raw=conv.job)
    assert job.train.ema_decay == decay and job.validation.use_ema is use_ema
    assert listed in "\n".join(conv.report())


def test_an_ema_updated_every_few_steps_is_not_ours(tmp_path):
    conv = convert_simpletuner(*write_setup(tmp_path, minimal(use_ema=True, ema_update_interval=10), BARE_SET))
    assert load_job(raw=conv.job).train.ema_decay == 0.995
    assert any("ema_update_interval = 10 (the EMA is updated after every optimizer step here" in line
               for line in conv.report())


@pytest.mark.parametrize(("settings", "ours", "listed"), [
    ({"scheduled_sampling_max_step_offset": 10, "scheduled_sampling_probability": 1.0,
      "scheduled_sampling_sampler": "euler"}, {"max_step_offset": 10, "probability": 1.0}, None),
    ({"scheduled_sampling_max_step_offset": 5, "scheduled_sampling_probability": 1.0,
      "scheduled_sampling_ramp_steps": 1000}, {"max_step_offset": 5, "ramp_steps": 1000, "prob_start": 0.0,
                                               "prob_end": 0.5}, "default rollout sampler (unipc)"),
    ({"scheduled_sampling_max_step_offset": 5, "scheduled_sampling_ramp_steps": 100,
      "scheduled_sampling_prob_start": 0.2, "scheduled_sampling_prob_end": 0.9, "scheduled_sampling_sampler": "euler"},
     {"max_step_offset": 5, "ramp_steps": 100, "prob_start": 0.2, "prob_end": 0.9}, None),
    ({"scheduled_sampling_max_step_offset": 5}, None, "SimpleTuner's default 0.0) rolls nothing out"),
    ({"scheduled_sampling_max_step_offset": 0, "scheduled_sampling_probability": 0.5}, None,
     "scheduled_sampling_probability = 0.5 (only read with scheduled_sampling_max_step_offset > 0)"),
])
def test_simpletuners_scheduled_sampling_becomes_ours(tmp_path, settings, ours, listed):
    conv = convert_simpletuner(*write_setup(tmp_path, minimal(**settings), BARE_SET))
    ss = load_job(raw=conv.job).flow.scheduled_sampling
    assert (ss.model_dump(exclude_none=True, exclude_defaults=False) if ss else None) == (
        None if ours is None else {"ramp_steps": 0, **ours})
    if listed:
        assert listed in "\n".join(conv.report())


@pytest.mark.parametrize(("setting", "key"), [
    ({"scheduled_sampling_sampler": "unipc"}, 'scheduled_sampling_sampler = "unipc"'),
    ({"scheduled_sampling_strategy": "biased_early"}, 'scheduled_sampling_strategy = "biased_early"'),
    ({"scheduled_sampling_ramp_shape": "cosine"}, 'scheduled_sampling_ramp_shape = "cosine"'),
    ({"scheduled_sampling_start_step": 100}, "scheduled_sampling_start_step = 100"),
    ({"scheduled_sampling_reflexflow": True}, "scheduled_sampling_reflexflow = true"),
])
def test_rollouts_we_do_not_take_are_refused_unless_lossy(tmp_path, capsys, setting, key):
    cfg, mdb = write_setup(tmp_path, minimal(scheduled_sampling_max_step_offset=4, scheduled_sampling_probability=1,
                                             **setting), ONE_SQUARE_SET)
    out = tmp_path / "job.yaml"
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"  {cfg}: {key} (" in err and "pass --lossy" in err and not out.exists()
    assert main(["simpletuner", str(cfg), str(mdb), "-o", str(out), "--lossy"]) == 0
    assert load_job(out).flow.scheduled_sampling.max_step_offset == 4
