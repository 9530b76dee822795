"""Live validation previews: a real HTTP server gets Discord's multipart form (payload_json + files[0]) with a valid
PNG; a failing, refusing, unreachable or slow webhook costs bounded retries and one warning per kind, never an
exception or the URL's token; the Tiny AutoEncoder decodes the sampler's latents as diffusers' pipeline would."""

import io
import socket
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image

from raytune_sd3.config import ValidationConfig
from raytune_sd3.models.loading import load_sampler, load_transformer, load_vae
from raytune_sd3.testmodels.tiny_validation import build_tiny_taesd
from raytune_sd3.train.previews import Caption, PreviewDecoder, WebhookPoster, png_bytes
from raytune_sd3.train.validation import sample_images
from tests.webhook_server import WebhookServer

TOKEN = "s3cr3t-T0KEN-value"


def _image(seed: int, size=(24, 32)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def test_poster_sends_the_png_and_a_discord_payload():
    with WebhookServer() as server:
        poster = WebhookPoster(server.url())
        sent = [_image(0), _image(1)]
        # a final image goes as the PNG file validation wrote: its bytes as they are, not decoded and encoded again
        written = io.BytesIO()
        Image.fromarray(sent[1]).save(written, format="PNG", compress_level=1)  # not png_bytes' own encoding
        assert poster.post(sent[0], Caption("a red circle", 20, 4, 8, (32, 24)))
        assert poster.post(written.getvalue(), Caption("a blue square", 20, 8, 8, (32, 24), final=True))
        poster.close()
    assert server.errors == [] and poster.sent == 2 and len(server.received) == 2
    first, final = server.received
    assert first.path == f"/api/webhooks/1234/{TOKEN}"
    assert np.array_equal(first.image, sent[0]) and np.array_equal(final.image, sent[1])  # PNG is lossless
    assert final.png == written.getvalue() != png_bytes(sent[1])
    assert first.payload["content"] == "step 20, preview at sampler step 4/8 (32x24): a red circle"
    assert final.payload["content"] == "step 20, final image (32x24): a blue square"
    embed = first.payload["embeds"][0]
    assert embed["title"] == "a red circle"
    assert embed["image"]["url"] == f"attachment://{first.filename}"
    assert {f["name"]: f["value"] for f in embed["fields"]} == {"training step": "20", "sampler step": "4/8",
                                                               "size": "32x24"}
    assert first.payload["attachments"] == [{"id": 0, "filename": first.filename}]
    assert first.payload["allowed_mentions"] == {"parse": []}
    assert first.filename != final.filename


def test_a_long_prompt_fits_discord_limits():
    payload = Caption("word " * 1000, 1, 1, 2, (64, 64)).payload()
    assert len(payload["content"]) == 2000 and len(payload["embeds"][0]["title"]) == 256


@pytest.mark.parametrize(("statuses", "requests", "kind"), [
    ([500], 2 * 5, "HTTP 500"),  # a server error: every image retried (2 attempts), then dropped
    ([404], 1, "HTTP 404"),  # refused: the webhook is given up on after the first post
    ([429, 204], 5 + 1, None),  # rate limited once, then delivered on the retry
])
def test_failures_are_bounded_warned_once_and_never_raise(statuses, requests, kind):
    warnings = []
    with WebhookServer(statuses=statuses) as server:
        poster = WebhookPoster(server.url(), attempts=2, backoff=0.01, warn=warnings.append)
        for i in range(5):
            poster.post(_image(i), Caption("p", 1, 1, 4, (32, 24)))
        poster.close()
    assert server.requests == requests
    if kind is None:
        assert warnings == [] and poster.sent == 5
    else:
        assert len(warnings) == 1 and kind in warnings[0], warnings
    assert not any(TOKEN in w for w in warnings)


def test_a_503_is_retried_after_its_retry_after_and_then_delivered(monkeypatch):
    """The server says 503 with Retry-After: 7, then takes the post: the image arrives whole on the second try,
    after the wait the server asked for (urllib3's sleep recorded, not slept)."""
    import urllib3.util.retry

    slept: list[float] = []
    # urllib3's retry module alone gets a clock whose sleep is recorded: patching time.sleep itself would also record
    # the sleeps of any other thread of this process (the session's Ray driver has several).
    clock = types.SimpleNamespace(sleep=slept.append, time=time.time)
    monkeypatch.setattr(urllib3.util.retry, "time", clock)
    warnings = []
    sent = _image(3)
    with WebhookServer(statuses=[503, 200], retry_after="7") as server:
        poster = WebhookPoster(server.url(), attempts=3, backoff=0.01, max_wait=30, warn=warnings.append)
        assert poster.post(sent, Caption("a red circle", 12, 2, 8, (32, 24)))
        poster.close()
    assert server.requests == 2 and slept == [7]
    assert warnings == [] and poster.sent == 1 and poster.failed == 0 and server.errors == []
    (got,) = server.received
    assert np.array_equal(got.image, sent)
    assert got.payload["content"] == "step 12, preview at sampler step 2/8 (32x24): a red circle"
    assert got.filename == Caption("a red circle", 12, 2, 8, (32, 24)).filename

    # a Retry-After longer than max_wait waits max_wait (a webhook cannot hold the previews for an hour)
    slept.clear()
    with WebhookServer(statuses=[429, 204], retry_after="3600") as server:
        poster = WebhookPoster(server.url(), attempts=2, max_wait=10, warn=warnings.append)
        poster.post(sent, Caption("p", 1, 1, 4, (32, 24)))
        poster.close()
    assert server.requests == 2 and slept == [10] and poster.sent == 1 and warnings == []


def test_a_dead_webhook_holds_the_runs_end_for_wait_s_at_most():
    """close() sends what is queued but gives up after `wait_s`: a webhook that keeps answering 503 and asks for a
    wait does not hold the end of a run (the loop closes with 15 s)."""
    warnings = []
    with WebhookServer(statuses=[503], retry_after="1") as server:
        poster = WebhookPoster(server.url(), attempts=3, backoff=0.01, max_wait=1, warn=warnings.append)
        for i in range(3):
            poster.post(_image(i), Caption("p", 1, 1, 4, (32, 24)))
        t0 = time.monotonic()
        poster.close(wait_s=0.3)
        waited = time.monotonic() - t0
        assert server.requests == 1 and poster.sent == 0  # the first image's first try; its retry still waiting
    assert 0.25 < waited < 2.0, waited  # without the bound: every image's retries, about 6 s
    poster.close()  # the rest now fails at once (the server is gone) and the thread ends, its log filter with it
    assert poster.failed == 3 and poster.sent == 0


def test_urllib3s_retry_messages_never_quote_the_token(caplog):
    """urllib3 logs each retry with the request's path (the token): those records are dropped, not shown."""
    import logging

    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")  # setup_logging (another test ran it) sets urllib3 to WARNING
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    poster = WebhookPoster(f"http://127.0.0.1:{port}/api/webhooks/1/{TOKEN}", attempts=3, backoff=0.01,
                           warn=lambda _: None)
    poster.post(_image(0), Caption("p", 1, 1, 4, (32, 24)))
    poster.close()
    assert poster.failed == 1 and caplog.records  # urllib3 did log (its connection lines)
    assert TOKEN not in caplog.text
    assert not logging.getLogger("urllib3.connectionpool").filters  # the filter leaves with the poster


def test_unreachable_and_slow_webhooks_warn_once():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    warnings = []
    poster = WebhookPoster(f"http://127.0.0.1:{port}/api/webhooks/1/{TOKEN}", attempts=2, backoff=0.01,
                           warn=warnings.append)
    for i in range(3):
        poster.post(_image(i), Caption("p", 1, 1, 4, (32, 24)))
    poster.close()
    assert len(warnings) == 1 and "connection error" in warnings[0] and poster.failed == 3
    assert "http://127.0.0.1/<redacted>" in warnings[0] and TOKEN not in warnings[0]

    warnings.clear()
    with WebhookServer(delay=1.0) as server:
        poster = WebhookPoster(server.url(), timeout=0.2, attempts=2, backoff=0.01, warn=warnings.append)
        t0 = time.monotonic()
        for i in range(2):
            assert poster.post(_image(i), Caption("p", 1, 1, 4, (32, 24)))
        assert time.monotonic() - t0 < 0.1  # post() never waits for the network
        poster.close()
    assert [w.split(": ")[1] for w in warnings] == ["timeout"] and poster.failed == 2


def test_a_full_queue_drops_previews_instead_of_blocking():
    warnings = []
    with WebhookServer(delay=0.5) as server:
        poster = WebhookPoster(server.url(), queue_size=1, warn=warnings.append)
        t0 = time.monotonic()
        results = [poster.post(_image(i), Caption("p", 1, i, 9, (32, 24))) for i in range(6)]
        assert time.monotonic() - t0 < 0.2
        poster.close()
    # at most one in flight and one waiting; the rest dropped, and said so once
    assert results[0] and 1 <= sum(results) <= 2 and poster.dropped == 6 - sum(results)
    assert len(warnings) == 1 and "queue full" in warnings[0]
    assert len(server.received) == sum(results)


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory):
    return build_tiny_taesd(tmp_path_factory.mktemp("taesd") / "tiny-taesd3")


def test_tiny_taesd_is_reproducible(taesd_dir, tmp_path):
    again = build_tiny_taesd(tmp_path / "again")
    name = "diffusion_pytorch_model.safetensors"
    assert (again / name).read_bytes() == (taesd_dir / name).read_bytes()
    from diffusers import AutoencoderTiny

    assert AutoencoderTiny.from_pretrained(taesd_dir).config.latent_channels == 16  # SD3's latent space


def test_preview_decode_equals_diffusers_pipeline_with_the_tiny_autoencoder(tiny_pipe, taesd_dir):
    """Our decode of the sampler's latents (unscaled by the SD3 VAE's factors) equals diffusers' pipeline decoding
    the same latents with the AutoencoderTiny as its VAE (which unscales by the TAESD's own config)."""
    from diffusers import AutoencoderTiny, StableDiffusion3Pipeline

    args = {"prompt_embeds": torch.randn(1, 333, 96, generator=torch.Generator().manual_seed(0)),
            "pooled_prompt_embeds": torch.randn(1, 80, generator=torch.Generator().manual_seed(1)),
            "height": 64, "width": 96, "num_inference_steps": 3, "guidance_scale": 1.0}
    latents = tiny_pipe(**args, output_type="latent", generator=torch.Generator().manual_seed(2)).images
    taesd = AutoencoderTiny.from_pretrained(taesd_dir)
    with_taesd = StableDiffusion3Pipeline(**{**tiny_pipe.components, "vae": taesd})
    with_taesd.set_progress_bar_config(disable=True)
    ref = with_taesd(**args, output_type="np", generator=torch.Generator().manual_seed(2)).images[0]

    decoder = PreviewDecoder(taesd_dir, every=1, poster=None)
    ours = decoder.decode(latents, tiny_pipe.vae.config.scaling_factor, tiny_pipe.vae.config.shift_factor)
    assert ours[0].shape == (64, 96, 3)
    assert np.abs(ours[0].astype(int) - np.round(ref * 255).astype(int)).max() <= 1  # uint8 rounding


def test_sampling_posts_a_preview_every_n_sampler_steps(tiny_sd3, taesd_dir, tmp_path):
    transformer, vae, sched = load_transformer(tiny_sd3), load_vae(tiny_sd3), load_sampler(tiny_sd3)
    g = torch.Generator().manual_seed(0)
    embeds = [{"prompt": p, "prompt_embeds": torch.randn(333, 96, generator=g), "pooled": torch.randn(80, generator=g)}
              for p in ("a red circle", "a blue square")]
    uncond = {"prompt_embeds": torch.zeros(333, 96), "pooled": torch.zeros(80)}
    cfg = ValidationConfig(prompts=["a red circle", "a blue square"], resolution="64x64,96x64", steps=5, guidance=2.0)
    with WebhookServer() as server:
        poster = WebhookPoster(server.url())
        decoder = PreviewDecoder(taesd_dir, every=2, poster=poster)
        paths = sample_images(transformer, vae, sched, embeds, uncond, cfg, tmp_path / "with", "cpu",
                              step_callback=lambda prompt, size: decoder.for_image(prompt, 30, size, cfg.steps))
        poster.close()
    assert server.errors == []
    # sampler steps 2 and 4 of 5 (the 5th is the final image), for each prompt at each size, in sampling order
    got = [(r.payload["embeds"][0]["title"], r.image.shape[:2],
            {f["name"]: f["value"] for f in r.payload["embeds"][0]["fields"]}["sampler step"]) for r in server.received]
    assert got == [(p, hw, f"{k}/5") for p in ("a red circle", "a blue square") for hw in ((64, 64), (64, 96))
                   for k in (2, 4)]
    assert all("step 30," in r.payload["content"] for r in server.received)
    assert not np.array_equal(server.received[0].image, server.received[1].image)  # step 2 is not step 4

    # the previews leave the images as they were
    plain = sample_images(transformer, vae, sched, embeds, uncond, cfg, tmp_path / "plain", "cpu")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in plain]
