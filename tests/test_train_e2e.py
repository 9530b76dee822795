"""The demo job end to end through the real CLI: local Ray, tiny SD3, Ray Data cache, 2-worker DDP, outputs.
run1 also carries the validation extras (one run proves them all; each pipeline run costs a minute of the suite):
CLIP score in metrics.jsonl at each validation step, equal to the score of the PNGs on disk; curves.png with the
loss and the CLIP score side by side; previews and final images at a real HTTP webhook whose token reaches no file
and not the console; and, in its revalidation, a failing webhook that costs one warning, never the run."""
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from raytune_sd3.config import load_job
from raytune_sd3.train.clip_score import ClipScorer
from tests.webhook_server import WebhookServer

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"step", "loss", "lr", "grad_norm", "step_time_s", "images_per_s"}


SECRET = "wandb-key-that-must-not-leak-0123456789"
TOKEN = "webhook-token-that-must-not-leak-42"
# run1's settings beyond jobs/tiny.yaml (every rerun of it passes them again): a card peak for an MFU, W&B offline,
# an EMA of the LoRA that the validation images are sampled with, a negative prompt, scheduled sampling (each DDP
# rank rolls its own items a different number of forwards), and the validation extras: validation at steps 20 and
# 40, CLIP scores, previews at sampler step 4 of 8 to a webhook (its URL, a secret, is recorded redacted, so a
# rerun may name another server: webhook_url()).
NEGATIVE = "a green triangle"
RUN1_SETS = ("train.peak_tflops=0.05", "wandb.project=raytune-sd3-tests", "wandb.mode=offline", "train.ema_decay=0.9",
             "validation.use_ema=true", f"validation.negative_prompt={NEGATIVE}", "validation.every_steps=20",
             "validation.clip_score=true", "validation.preview_steps=4",
             "flow.scheduled_sampling.max_step_offset=2", "flow.scheduled_sampling.probability=0.5")
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]  # jobs/tiny.yaml's


def webhook_url(server: WebhookServer | None = None) -> str:
    """The webhook setting of a run of run1: the server's, or a closed port for a rerun that must reach none."""
    path = f"/api/webhooks/99/{TOKEN}"
    return "validation.webhook_url=" + (server.url(path) if server else f"http://127.0.0.1:9{path}")


def saved_job(out: Path):
    """The job.yaml a run of run1 wrote, loaded as a rerun would (its webhook URL was redacted: given again)."""
    return load_job(out / "job.yaml", [webhook_url()])


def run_job(tmp: Path, out: str, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml", "--set", f"output_dir={tmp / out}",
           "--set", f"data.cache_dir={tmp / 'cache'}", "--set", f"data.datasets.0.instance_data_dir={tmp / 'demo'}"]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The demo job as a user runs it, with W&B in offline mode and a W&B key in the environment (which must not
    leak), and a card peak given so that the CPU run logs an MFU. Returns its tmp folder and its console output.
    (A second run on the same cache reuses it: test_tune's run of best.yaml checks that.)
    The key is also a config value (model.revision, which the local tiny model ignores): the environment alone
    reaches no file of ours, the config reaches job.yaml and W&B, so this is where stripping it is tested.
    As on a fresh machine: an empty model home (the tiny model is built) and matplotlib's font cache not yet made."""
    tmp = tmp_path_factory.mktemp("e2e")
    fresh = {"RAYTUNE_SD3_HOME": str(tmp / "home"), "MPLCONFIGDIR": str(tmp / "matplotlib")}
    with WebhookServer() as server:
        r = run_job(tmp, "run1", *RUN1_SETS, webhook_url(server),
                    f"model.revision={SECRET}", env={"WANDB_API_KEY": SECRET, **fresh})
    assert (tmp / "home").is_dir() and (tmp / "matplotlib").is_dir()  # both made by this run: it was a first run
    return tmp, r.stdout + r.stderr, server


@pytest.mark.slow
def test_outputs_of_the_tiny_job(first_run, tiny_sd3):
    out = first_run[0] / "run1"
    cfg = saved_job(out)
    assert cfg.output_dir == out and cfg.train.max_steps == 40

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 41))
    assert all(REQUIRED <= set(r) for r in steps)
    assert all(r["images_per_s"] > 0 and r["grad_norm"] > 0 for r in steps)
    # scheduled sampling: the mean rollout length of each step's global batch (2 workers), as the draws give it
    from raytune_sd3.train.loop import rollout_steps_of

    drawn = [float(torch.cat([rollout_steps_of(cfg, r["step"], slot) for slot in (0, 1)]).float().mean())
             for r in steps]
    assert [r["rollout_steps"] for r in steps] == drawn and 0 < sum(drawn) < 2 * len(drawn)
    evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
    assert set(evals) == {0, 20, 40}
    # learning is real: fixed sigmas and fixed noise on held-out images, so the drop is not noise
    assert evals[40] < 0.97 * evals[0], evals

    images = sorted((out / "validation" / "step_000040").glob("*.png"))
    assert [p.name for p in images] == ["00_64x64.png", "01_64x64.png"]

    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(out)
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        n_saved = len(list(f.keys()))
    n_loaded = sum(1 for k in pipe.transformer.state_dict() if "lora_" in k)
    assert n_saved == n_loaded > 0
    b = next(k for k in pipe.transformer.state_dict() if "lora_B" in k)
    assert torch.count_nonzero(pipe.transformer.state_dict()[b]) > 0  # trained, not the zero init

    # the EMA beside it loads the same way, every key matched, and is not the LoRA itself
    ema_pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    ema_pipe.load_lora_weights(out, weight_name="pytorch_lora_weights_ema.safetensors")
    ema_b = ema_pipe.transformer.state_dict()[b]
    assert sum(1 for k in ema_pipe.transformer.state_dict() if "lora_" in k) == n_loaded
    assert torch.count_nonzero(ema_b) > 0 and not torch.allclose(ema_b, pipe.transformer.state_dict()[b])
    # the negative prompt was encoded into the cache with the validation prompts, and the workers were told its key
    from raytune_sd3.data.manifest import read_manifest

    validation = read_manifest(out / "manifest.parquet", ())["validation"]
    assert {v["prompt"] for v in validation} == set(cfg.validation.prompts) and cfg.validation.negative_prompt == NEGATIVE
    assert len({v["negative_key"] for v in validation}) == 1 and validation[0]["negative_key"] != validation[0]["text_key"]

    report = json.loads((out / "cache_report.json").read_text())
    assert report["latents_encoded"] == 48 and report["latents_reused"] == 0 and report["skipped"] == []


# A line of ours: a log line (time first), the indented continuation of one, or a worker's prefixed line.
OUR_LINE = re.compile(r"(\d\d:\d\d:\d\d |  \S|raytune_sd3: )")
# What third parties printed on a first run before it was routed to ray.log or silenced at its source.
THIRD_PARTY = ("kernels-community", "publisher trust", "torchvision", "real_accelerator", "Writing model shards",
               "Token authentication", "core_worker", "fontManager", "[transformers]", "[WARNING]")


def third_party_lines(console: str) -> list[str]:
    return [line for line in console.splitlines()
            if not OUR_LINE.match(line) or any(marker in line for marker in THIRD_PARTY)]


@pytest.mark.slow
def test_the_console_is_for_a_person(first_run):
    """A first run prints our lines only, at most 15 (auto choices, one progress line per stage, where the results
    are); Ray's own output and every third party's, which used to be most of it, in output_dir/ray.log."""
    out, console = first_run[0] / "run1", first_run[1]
    assert not third_party_lines(console), console
    assert len(console.splitlines()) <= 15, console
    assert f"Ray's own output: {out / 'ray.log'}" in console
    assert "caching images: 48/48 img" in console and "training: 40/40 step" in console
    assert "train.num_workers auto -> 2" in console and f"LoRA: {out / 'pytorch_lora_weights.safetensors'}" in console
    ray_chatter = ("Reporting training result", "streaming_executor", "RayTrainWorker pid=", "Execution plan")
    assert not [c for c in ray_chatter if c in console], console[-3000:]
    ray_log = (out / "ray.log").read_text()
    assert "(RayTrainWorker pid=" in ray_log and "Reporting training result" in ray_log  # moved, not lost
    assert "generated new fontManager" in ray_log  # matplotlib's first-run notice: moved, not lost


@pytest.mark.slow
def test_a_finished_run_rerun_is_not_retrained(first_run):
    """The same command again: it says the run is trained and exits 0 without starting Ray (no new ray.log lines,
    metrics.jsonl and the LoRA untouched); with a larger max_steps it would train on (the normal path)."""
    tmp = first_run[0]
    out = tmp / "run1"
    files = [out / "metrics.jsonl", out / "pytorch_lora_weights.safetensors", out / "ray.log"]
    before = [(f.stat().st_mtime_ns, f.read_bytes()) for f in files]
    r = run_job(tmp, "run1", *RUN1_SETS, webhook_url(),
                f"model.revision={SECRET}", env={"WANDB_API_KEY": SECRET})  # redact() knows the key by it
    assert "already trained: step 40 of 40" in r.stdout + r.stderr
    assert "Ray's own output" not in r.stdout + r.stderr  # Ray was never started
    assert [(f.stat().st_mtime_ns, f.read_bytes()) for f in files] == before


@pytest.mark.slow
def test_a_diverging_run_exits_3_with_the_reason(first_run, shared_ray):
    """An absurd learning rate on the demo's (already filled) cache: the gradient-norm guard stops the run as
    diverged, the CLI exits 3 and says why, metrics.jsonl ends with the reason, and no LoRA is copied out.
    It starts from run1's LoRA (lora.init_from, its folder): its step-0 eval loss is run1's last one."""
    tmp = first_run[0]
    cmd = [sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml", "--set", f"output_dir={tmp / 'diverged'}",
           "--set", f"data.cache_dir={tmp / 'cache'}", "--set", f"data.datasets.0.instance_data_dir={tmp / 'demo'}",
           "--set", "train.learning_rate=1.0e+3", "--set", "train.grad_norm_limit=1.0e+4", "--set", "train.max_steps=12",
           "--set", "validation.prompts=[]", "--set", f"lora.init_from={tmp / 'run1'}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=shared_ray)
    assert r.returncode == 3, r.stdout[-2000:] + r.stderr[-3000:]
    records = [json.loads(line) for line in (tmp / "diverged" / "metrics.jsonl").read_text().splitlines()]
    ended = [json.loads(line) for line in (tmp / "run1" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["step"] == 40 and "eval_loss" in json.loads(line)][0]["eval_loss"]
    assert records[0]["step"] == 0 and records[0]["eval_loss"] == pytest.approx(ended, rel=1e-6)
    last = records[-1]
    assert last["diverged"] == 1 and last["step"] < 12
    assert f"training diverged at step {last['step']}: {last['diverged_reason']}" in r.stderr
    assert not (tmp / "diverged" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_mfu_from_the_counted_flops(first_run, tiny_sd3):
    """metrics' MFU is F_train (train/flops.py, counted on the step's batch shape) plus one forward of an item per
    rolled step of rank 0's items (scheduled sampling), over the step time and the peak."""
    from raytune_sd3.models.loading import load_transformer
    from raytune_sd3.models.lora import add_lora
    from raytune_sd3.train.flops import count_flops

    out = first_run[0] / "run1"
    steps = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]
    cfg = saved_job(out)
    model = load_transformer(tiny_sd3)
    add_lora(model, cfg.lora, seed=0)
    x = dict(hidden_states=torch.randn(cfg.train.batch_size, 16, 8, 8), timestep=torch.full((4,), 500.0),
             encoder_hidden_states=torch.randn(4, 77 + 77, model.config.joint_attention_dim),
             pooled_projections=torch.randn(4, model.config.pooled_projection_dim), return_dict=False)
    from raytune_sd3.train.loop import rollout_steps_of

    count = count_flops(model, lambda: model(**x))
    for m in steps:
        flops = count.training() + count.forward * int(rollout_steps_of(cfg, m["step"], 0).sum()) // 4
        assert m["tflops_per_s"] == pytest.approx(flops / m["step_time_s"] / 1e12, rel=1e-6)
        assert m["mfu"] == pytest.approx(m["tflops_per_s"] / 0.05, rel=1e-6) and 0 < m["mfu"]


def wandb_records(path: Path):
    """The protobuf records of a W&B transaction log (.wandb): a 7-byte header, then leveldb-style chunks
    (crc32, length, type FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


@pytest.mark.slow
def test_wandb_offline_run_has_the_metrics_and_images_and_no_secret(first_run):
    out, console = first_run[0] / "run1", first_run[1]
    logs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1, logs
    history, run = {}, None
    for r in wandb_records(logs[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    assert run.project == "raytune-sd3-tests" and run.display_name == "run1"
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert sorted(history) == sorted(metrics) == list(range(41))
    for step, m in metrics.items():
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in m:
                assert history[step][key] == pytest.approx(m[key]), (step, key)
    # the two validation prompts' images at each validation step (20, 40), captioned with their prompts, and each
    # prompt's CLIP score, equal to the score of the PNG on disk
    prompts = saved_job(out).validation.prompts
    scorer = ClipScorer(first_run[0] / "home" / "models" / "tiny-clip")  # the tiny CLIP that run built
    for step in (20, 40):
        assert history[step]["validation/count"] == 2
        assert history[step]["validation/captions"] == [f"{p} (64x64)" for p in prompts]
        per_prompt = scorer.score_folder(out / "validation" / f"step_{step:06d}", PROMPTS)
        assert history[step]["clip_score/00"] == pytest.approx(per_prompt[0], abs=1e-4)
        assert history[step]["clip_score/01"] == pytest.approx(per_prompt[1], abs=1e-4)
        assert history[step]["clip_score"] == pytest.approx(sum(per_prompt.values()) / 2, abs=1e-4)
    assert not any("validation/count" in h or "clip_score/00" in h for step, h in history.items()
                   if step not in (20, 40))

    assert saved_job(out).model.revision == "<redacted>"  # the key reached the config, and was cut
    leaked = [p for p in out.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaked and SECRET not in console


@pytest.mark.slow
def test_the_run_writes_its_model_card(first_run):
    """With no hub.repo_id the card is still written (train_job -> hub.publish): it links the last validation
    images, copied beside it, with their prompts. (The secret check above covers it too.)"""
    from raytune_sd3.hub.publish import front_matter

    out = first_run[0] / "run1"
    text = (out / "README.md").read_text()
    meta = front_matter(text)
    assert [w["text"] for w in meta["widget"]] == saved_job(out).validation.prompts
    assert all((out / w["output"]["url"]).read_bytes() == (out / "validation" / "step_000040" / Path(
        w["output"]["url"]).name).read_bytes() for w in meta["widget"])
    assert "trained with raytune_sd3 for 40 steps" in text and 'pipe.load_lora_weights("path/to/this/folder")' in text
    assert "model card:" in first_run[1] and "upload" not in first_run[1]


@pytest.mark.slow
def test_clip_score_is_logged_at_each_validation_step_and_plotted(first_run):
    out = first_run[0] / "run1"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["clip_score"] for r in records if "clip_score" in r}
    assert set(scores) == {20, 40}
    # the logged mean is the score of the images written at that step, by the tiny CLIP the run defaulted to
    scorer = ClipScorer(first_run[0] / "home" / "models" / "tiny-clip")
    for step, logged in scores.items():
        per_prompt = scorer.score_folder(out / "validation" / f"step_{step:06d}", PROMPTS)
        assert set(per_prompt) == {0, 1}
        assert logged == pytest.approx(sum(per_prompt.values()) / 2, abs=1e-4)
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1300, 450)  # two panels: loss, CLIP score


@pytest.mark.slow
def test_previews_and_final_images_reach_the_webhook(first_run):
    server = first_run[2]
    assert server.errors == []
    got = sorted((r.payload["content"].split(":")[0], r.payload["embeds"][0]["title"]) for r in server.received)
    # per validation step (20, 40) and prompt: a preview at sampler step 4 of 8 (the 8th is the final image) and
    # the final image, 64x64
    assert got == sorted((f"step {s}, {what} (64x64)", p) for s in (20, 40) for p in PROMPTS
                         for what in ("preview at sampler step 4/8", "final image"))
    assert all(r.image.shape == (64, 64, 3) for r in server.received)
    assert all(r.path == f"/api/webhooks/99/{TOKEN}" for r in server.received)


def files_holding(folder: Path, secret: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_the_webhook_token_is_in_no_file_and_not_on_the_console(first_run):
    out, console = first_run[0] / "run1", first_run[1]
    assert (out / "job.yaml").read_text().count("webhook_url: <redacted>") == 1
    assert files_holding(out, TOKEN) == []  # job.yaml, ray.log, metrics, checkpoints, settings
    assert TOKEN not in console


@pytest.mark.slow
def test_a_finished_run_rerun_with_other_validation_settings_validates_again(first_run, shared_ray):
    """Another validation setting on a finished run (as the README's `--set validation.clip_score=true`): no step
    is trained (the LoRA and the metrics of steps 1-40 unchanged); the final LoRA is validated with the new
    settings, whose measure is on the last metrics line, and an error.log of an earlier attempt is moved aside.
    Its webhook answers 503 with Retry-After: 0 to everything: 2 previews and 2 final images, 3 attempts each with
    no wait between them (test_previews checks that a webhook asking for longer waits holds the run's end 15 s at
    most), one warning in ray.log for the kind, not one per image, and the run succeeds. (Last in this file: it
    adds a line to run1's metrics.jsonl.)"""
    tmp = first_run[0]
    out = tmp / "run1"
    lora = (out / "pytorch_lora_weights.safetensors").read_bytes()
    before = (out / "metrics.jsonl").read_text().splitlines()
    (out / "error.log").write_text("an earlier failure")
    with WebhookServer(statuses=[503], retry_after="0") as server:
        r = run_job(tmp, "run1", *RUN1_SETS, webhook_url(server),
                    f"model.revision={SECRET}", "validation.guidance=4.0", env={**shared_ray, "WANDB_API_KEY": SECRET})
    said = r.stdout + r.stderr
    assert "validating its final LoRA again" in said and "validation.guidance: 3.0 -> 4.0" in said, said[-3000:]
    after = (out / "metrics.jsonl").read_text().splitlines()
    assert after[:len(before)] == before and len(after) == len(before) + 1
    last = json.loads(after[-1])
    assert last["step"] == 40 and last["revalidated"] == 1 and last["clip_score"] > 0
    assert last["clip_score"] != json.loads(before[-1]).get("clip_score")  # other images: another guidance
    assert last["eval_loss"] == json.loads(before[-1])["eval_loss"]  # the final step's measures are kept
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == lora
    assert not (out / "error.log").exists() and (out / "error.previous.log").read_text() == "an earlier failure"

    assert server.received == [] and server.requests == 4 * 3
    # (Ray Train's worker-output capture may write the background thread's line to both the worker's .out and
    # .err, so ray.log can hold it twice: one distinct line)
    warnings = {line for line in (out / "ray.log").read_text().splitlines() if "validation webhook" in line}
    assert len(warnings) == 1 and "HTTP 503" in next(iter(warnings)), warnings
    assert files_holding(out, TOKEN) == [] and TOKEN not in said

    r = run_job(tmp, "run1", *RUN1_SETS, webhook_url(),
                f"model.revision={SECRET}", "validation.guidance=4.0", env={"WANDB_API_KEY": SECRET})
    assert "already trained: step 40 of 40" in r.stdout + r.stderr  # now the run's own settings


@pytest.mark.slow
@pytest.mark.parametrize(("optimizer", "lr"), [("prodigy", 1.0), ("adamw_schedulefree", 1.0e-2)])
def test_prodigy_and_schedule_free_lower_the_demo_eval_loss(first_run, tiny_sd3, optimizer, lr, monkeypatch):
    """The train loop itself (WorkerRun) with each optimiser on the demo's (already filled) cache, in Ray Train's
    local mode (ScalingConfig(num_workers=0): the worker function in this process, no cluster, seconds): the eval
    loss at the end is below the one before training, Prodigy's d grew, is logged and is in the checkpoint, and a
    schedule-free checkpoint is taken in eval mode (its LoRA the average x)."""
    import ray
    import ray.train
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytune_sd3.run_layout import MANIFEST
    from raytune_sd3.train.loop import train_loop_per_worker

    tmp = first_run[0]
    out = tmp / f"local-{optimizer}"
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [
        f"output_dir={out}", f"data.cache_dir={tmp / 'cache'}", f"data.datasets.0.instance_data_dir={tmp / 'demo'}",
        "model.dtype=fp32", "train.mixed_precision=no", "train.num_workers=1", "train.use_gpu=false",
        f"train.optimizer={optimizer}", f"train.learning_rate={lr}", "train.lr_scheduler=constant",
        "train.max_steps=16", "train.checkpoint_every=16", "validation.prompts=[]"])
    config = {"job": cfg.model_dump(mode="json"), "manifest": str(tmp / "run1" / MANIFEST), "pretrained": tiny_sd3,
              "run_dir": None, "revalidate": False, "clip_model": None, "preview_model": None}
    kept, report = tmp / f"checkpoint-{optimizer}", ray.train.report

    def keep_checkpoint(metrics, checkpoint=None, **kw):  # local mode uploads nothing: keep a copy to read
        if checkpoint is not None:
            shutil.copytree(checkpoint.path, kept)
        report(metrics, checkpoint=checkpoint, **kw)

    monkeypatch.setattr(ray.train, "report", keep_checkpoint)
    ray_was_up = ray.is_initialized()
    try:
        result = TorchTrainer(train_loop_per_worker, train_loop_config=config,
                              scaling_config=ScalingConfig(num_workers=0)).fit()
    finally:
        if not ray_was_up and ray.is_initialized():  # WorkerRun's ray.get_gpu_ids() starts one; later tests init
            ray.shutdown()                            # their own, with their settings
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in lines if "eval_loss" in r]
    assert [s for s, _ in evals] == [0, 16] and evals[1][1] < evals[0][1], evals
    saved = torch.load(kept / "optimizer_rank0.pt", weights_only=True)["param_groups"][0]
    assert (kept / "lora_raw.safetensors").is_file() and result.metrics["step"] == 16
    if optimizer == "prodigy":
        d = [r["prodigy_d"] for r in lines if "prodigy_d" in r]
        assert len(d) == 16 and d[-1] > 10 * d[0] and saved["d"] == d[-1]
    else:  # its own warmup over the job's 4 steps, then the peak
        assert [r["lr"] for r in lines if "lr" in r][:5] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2, 1e-2])
        assert saved["train_mode"] is False and saved["k"] == 16  # saved inside averaged_weights, after 16 steps
