"""CLIP score and live previews in a real training run (the demo job through the CLI, local Ray, 2 DDP workers):
clip_score in metrics.jsonl at each validation step, equal to the score of the PNGs on disk; curves.png with the
loss and the CLIP score side by side; previews and final images at a real HTTP webhook; the webhook's token in no
file of the run and not on the console. A webhook that fails costs one warning, never the run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from raytune_sd3.models.loading import tiny_models_root
from raytune_sd3.train.clip_score import ClipScorer
from tests.test_train_e2e import wandb_records
from tests.webhook_server import WebhookServer

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "webhook-token-that-must-not-leak-42"
PROMPTS = ["a red circle on a white background", "a blue square on a black background"]  # jobs/tiny.yaml's


def run_demo(tmp: Path, webhook_url: str, *more: str, data: Path | None = None) -> subprocess.CompletedProcess:
    """jobs/tiny.yaml, shortened to 6 steps with validation at steps 3 and 6 (8 sampler steps, previews every 4);
    `more` --set values last. The demo images and their cache in `data` (default `tmp`): another run's are warm."""
    data = data or tmp
    sets = [f"output_dir={tmp / 'out'}", f"data.cache_dir={data / 'cache'}",
            f"data.datasets.0.instance_data_dir={data / 'demo'}", "data.datasets.0.demo_images=16",
            "data.eval_samples=4", "train.max_steps=6", "train.lr_warmup_steps=1", "train.checkpoint_every=6",
            "train.eval_every=6", "validation.every_steps=3", "validation.clip_score=true",
            "validation.preview_steps=4", f"validation.webhook_url={webhook_url}", *more]
    cmd = [sys.executable, "-m", "raytune_sd3.train", "jobs/tiny.yaml", *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ))


def files_holding(folder: Path, secret: str) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extras")
    with WebhookServer() as server:
        r = run_demo(tmp, server.url(f"/api/webhooks/99/{TOKEN}"), "wandb.project=raytune-sd3-tests",
                     "wandb.mode=offline")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return tmp / "out", server, r.stdout + r.stderr


@pytest.mark.slow
def test_clip_score_is_logged_at_each_validation_step_and_plotted(run):
    out, _, _ = run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scores = {r["step"]: r["clip_score"] for r in records if "clip_score" in r}
    assert set(scores) == {3, 6}
    # the logged mean is the score of the images written at that step, by the tiny CLIP the run defaulted to
    scorer = ClipScorer(tiny_models_root() / "tiny-clip")
    for step, logged in scores.items():
        per_prompt = scorer.score_folder(out / "validation" / f"step_{step:06d}", PROMPTS)
        assert set(per_prompt) == {0, 1}
        assert logged == pytest.approx(sum(per_prompt.values()) / 2, abs=1e-4)
    with Image.open(out / "curves.png") as im:
        assert im.format == "PNG" and im.size == (1300, 450)  # two panels: loss, CLIP score


@pytest.mark.slow
def test_wandb_gets_each_prompts_clip_score(run):
    out, _, _ = run
    (log,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history: dict[int, dict] = {}
    for r in wandb_records(log):
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(items["_step"], {}).update(items)
    scorer = ClipScorer(tiny_models_root() / "tiny-clip")
    for step in (3, 6):
        per_prompt = scorer.score_folder(out / "validation" / f"step_{step:06d}", PROMPTS)
        assert history[step]["clip_score/00"] == pytest.approx(per_prompt[0], abs=1e-4)
        assert history[step]["clip_score/01"] == pytest.approx(per_prompt[1], abs=1e-4)
        assert history[step]["clip_score"] == pytest.approx(sum(per_prompt.values()) / 2, abs=1e-4)
    assert not any("clip_score/00" in h for step, h in history.items() if step not in (3, 6))


@pytest.mark.slow
def test_previews_and_final_images_reach_the_webhook(run):
    _, server, _ = run
    assert server.errors == []
    got = sorted((r.payload["content"].split(":")[0], r.payload["embeds"][0]["title"]) for r in server.received)
    # per validation step (3, 6) and prompt: a preview at sampler step 4 of 8 (the 8th is the final image) and the
    # final image, 64x64
    assert got == sorted((f"step {s}, {what} (64x64)", p) for s in (3, 6) for p in PROMPTS
                         for what in ("preview at sampler step 4/8", "final image"))
    assert all(r.image.shape == (64, 64, 3) for r in server.received)
    assert all(r.path == f"/api/webhooks/99/{TOKEN}" for r in server.received)


@pytest.mark.slow
def test_the_webhook_token_is_in_no_file_and_not_on_the_console(run):
    out, _, console = run
    assert (out / "job.yaml").read_text().count("webhook_url: <redacted>") == 1
    assert files_holding(out, TOKEN) == []  # job.yaml, ray.log, metrics, checkpoints, settings
    assert TOKEN not in console


@pytest.mark.slow
def test_a_failing_webhook_costs_one_warning_not_the_run(run, tmp_path):
    """On the warm cache of the run above (no caching pass), validating once, at the end, without CLIP scores."""
    with WebhookServer(statuses=[503]) as server:
        r = run_demo(tmp_path, server.url(f"/api/webhooks/99/{TOKEN}"), "validation.every_steps=6",
                     "validation.clip_score=false", data=run[0].parent)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = tmp_path / "out"
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    report = json.loads((out / "cache_report.json").read_text())
    assert report["latents_encoded"] == report["texts_encoded"] == 0  # the cache was warm
    # 2 previews and 2 final images, 3 attempts each, as far as the end of the run lets the retries go (the poster
    # waits 15 s at most)
    assert server.received == [] and 3 <= server.requests <= 4 * 3
    log = (out / "ray.log").read_text()
    # one warning for the kind, not one per image (Ray Train's worker-output capture may write the background
    # thread's line to both the worker's .out and .err, so ray.log can hold it twice: one distinct line)
    warnings = {line for line in log.splitlines() if "validation webhook" in line}
    assert len(warnings) == 1 and "HTTP 503" in next(iter(warnings)), warnings
    assert files_holding(out, TOKEN) == [] and TOKEN not in r.stdout + r.stderr
