"""Live validation previews: the sampler's latents decoded every N steps by a Tiny AutoEncoder, posted to a webhook.

    sampler step k (k % N == 0) -> latents -> (latents / scale + shift) -> AutoencoderTiny.decode -> PNG
        -> bounded queue -> background thread -> multipart POST (payload_json + files[0], as Discord takes it)

The sampler only decodes and copies to the host (milliseconds with a TAESD); PNG encoding and the network run in
one background thread, so a slow webhook never holds the GPU. The queue is bounded: when the webhook falls behind,
new previews are dropped (and said so once), never queued without end. The network never stops training: each
POST has a timeout and a few retries, each kind of failure is warned about once, and a webhook that refuses us
(a 4xx other than 429: a wrong or revoked URL) is given up on for the rest of the run. The form and the retries
are `requests`' and urllib3's (`Retry`: backoff, and a 429's or 503's Retry-After). The URL holds a token: messages
show its scheme and host only.
"""

from __future__ import annotations

import io
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import requests
import torch
from requests.adapters import HTTPAdapter
from urllib3.exceptions import NewConnectionError
from urllib3.exceptions import TimeoutError as Urllib3Timeout
from urllib3.util.retry import Retry

DISCORD_CONTENT_LIMIT = 2000  # characters of a message's `content`
DISCORD_TITLE_LIMIT = 256  # characters of an embed title


def shown_url(url: str) -> str:
    """The webhook as it may appear in a message: scheme and host, the path (which holds the token) hidden."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}/<redacted>"


@dataclass(frozen=True)
class Caption:
    """What an image shows: the prompt, the training step, the sampler step of how many, its size."""

    prompt: str
    step: int
    sampler_step: int
    sampler_steps: int
    size: tuple[int, int]
    final: bool = False

    @property
    def filename(self) -> str:
        kind = "final" if self.final else f"k{self.sampler_step:03d}"
        return f"step{self.step:06d}_{kind}_{self.size[0]}x{self.size[1]}.png"

    def payload(self) -> dict:
        """Discord's webhook JSON: a line of text, an embed showing the attached image, no mentions pinged."""
        what = "final image" if self.final else f"preview at sampler step {self.sampler_step}/{self.sampler_steps}"
        size = f"{self.size[0]}x{self.size[1]}"
        return {
            "content": f"step {self.step}, {what} ({size}): {self.prompt}"[:DISCORD_CONTENT_LIMIT],
            "embeds": [{
                "title": self.prompt[:DISCORD_TITLE_LIMIT],
                "image": {"url": f"attachment://{self.filename}"},
                "fields": [{"name": "training step", "value": str(self.step), "inline": True},
                           {"name": "sampler step", "value": f"{self.sampler_step}/{self.sampler_steps}",
                            "inline": True},
                           {"name": "size", "value": size, "inline": True}],
            }],
            "attachments": [{"id": 0, "filename": self.filename}],
            "allowed_mentions": {"parse": []},  # a prompt saying @everyone pings nobody
        }


def multipart_files(payload: dict, filename: str, png: bytes) -> dict:
    """`requests`' files= of Discord's multipart/form-data POST: `payload_json` and the PNG as `files[0]`."""
    return {"payload_json": (None, json.dumps(payload), "application/json"), "files[0]": (filename, png, "image/png")}


def png_bytes(image: np.ndarray) -> bytes:
    """A PNG of an (H, W, 3) uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _warn(message: str) -> None:
    print(f"raytune_sd3: warning: {message}", flush=True)  # stdout, as the loop's lines (Ray doubled stderr ones)


class WebhookPoster:
    """Posts (image, Caption) pairs to `url` from a background thread; `post` never blocks on the network.

    `timeout` seconds per attempt, `attempts` tries per image (urllib3's backoff: waits of 0, then `backoff` x 2,
    4...; a 429's or 503's Retry-After; each at most `max_wait`), at most `queue_size` images waiting. `warn` gets
    one message per kind of failure.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, attempts: int = 3, backoff: float = 1.0,
                 max_wait: float = 10.0, queue_size: int = 16, warn: Callable[[str], None] = _warn):
        self.url, self.timeout, self.attempts, self.backoff, self.max_wait = url, timeout, attempts, backoff, max_wait
        self._warn, self.warned = warn, set()
        self.sent = self.failed = self.dropped = 0
        self.given_up = False
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._session = webhook_session(attempts, backoff, max_wait)
        self._quiet = HideUrl(url)
        for name in URLLIB3_LOGGERS:
            logging.getLogger(name).addFilter(self._quiet)
        self._thread = threading.Thread(target=self._run, name="raytune-sd3-webhook", daemon=True)
        self._thread.start()

    def post(self, image: np.ndarray | bytes, caption: Caption) -> bool:
        """Queue an (H, W, 3) uint8 image, or a PNG file's bytes (sent as they are); False when it was dropped
        (queue full, or the webhook refused us)."""
        if self.given_up:
            return False
        try:
            self._queue.put_nowait((image, caption))
            return True
        except queue.Full:
            self.dropped += 1
            self._warn_once("queue full", "the webhook is slower than the sampler; previews are dropped until it "
                                          "catches up")
            return False

    def close(self, wait_s: float = 15.0) -> None:
        """Send what is queued, waiting at most `wait_s` seconds (a dead webhook does not hold the run's end)."""
        deadline = time.monotonic() + wait_s
        try:
            self._queue.put(None, timeout=wait_s)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))

    # --- the background thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._post_queued()
        finally:
            self._session.close()
            for name in URLLIB3_LOGGERS:
                logging.getLogger(name).removeFilter(self._quiet)

    def _post_queued(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.given_up:
                continue
            image, caption = item
            try:
                png = image if isinstance(image, bytes) else png_bytes(image)
            except Exception as e:  # noqa: BLE001 - a bad image is this image's problem, not the run's
                self.failed += 1
                self._warn_once(f"encoding ({type(e).__name__})", "an image could not be encoded as PNG")
                continue
            if self._send(multipart_files(caption.payload(), caption.filename, png)):
                self.sent += 1
            else:
                self.failed += 1

    def _send(self, files: dict) -> bool:
        """One image, retried by the session's Retry; True when the webhook took it."""
        try:
            response = self._session.post(self.url, files=files, timeout=self.timeout)
        except requests.RequestException as e:
            self._warn_once(_failure_kind(e), f"an image was not delivered after {self.attempts} attempts")
            return False
        code = response.status_code
        if code < 400:
            return True
        if code != 429 and code < 500:  # the URL is wrong or revoked; retrying will not change that
            self.given_up = True
            self._warn_once(f"HTTP {code}", "it refused the post; no more previews are sent this run "
                                            "(check validation.webhook_url)")
            return False
        kind = "HTTP 429 (rate limited)" if code == 429 else f"HTTP {code}"
        self._warn_once(kind, f"an image was not delivered after {self.attempts} attempts")
        return False

    def _warn_once(self, kind: str, what: str) -> None:
        if kind in self.warned:
            return
        self.warned.add(kind)
        self._warn(f"validation webhook {shown_url(self.url)}: {kind}: {what}. Training goes on; further "
                   f"'{kind}' failures are not reported.")


# urllib3's retry messages quote the request's path, which holds the webhook's token
URLLIB3_LOGGERS = ("urllib3.connectionpool", "urllib3.util.retry")


class HideUrl(logging.Filter):
    """Drops the log records that quote `url`'s path and query (the token); our own warning says what failed."""

    def __init__(self, url: str):
        super().__init__()
        parts = urlsplit(url)
        self.secret = parts.path + (f"?{parts.query}" if parts.query else "")

    def filter(self, record: logging.LogRecord) -> bool:
        return len(self.secret) <= 1 or self.secret not in record.getMessage()


def webhook_session(attempts: int, backoff: float, max_wait: float) -> requests.Session:
    """A session whose POSTs are tried `attempts` times on a 429, a 5xx, a timeout or a refused connection."""
    retry = Retry(total=attempts - 1, status_forcelist=[429, *range(500, 600)],
                  allowed_methods=None,  # POST too: a preview posted twice is harmless, one lost is not wanted
                  backoff_factor=backoff, backoff_max=max_wait, retry_after_max=max_wait,
                  raise_on_status=False)  # the last answer, not an exception: its status names the failure
    session = requests.Session()
    session.headers["User-Agent"] = "raytune_sd3 (validation previews)"
    for scheme in ("http://", "https://"):
        session.mount(scheme, HTTPAdapter(max_retries=retry))
    return session


def _failure_kind(error: requests.RequestException) -> str:
    """"timeout" or "connection error (WHY)" for a POST that got no answer (requests wraps urllib3's reason)."""
    reason = getattr(error.args[0], "reason", error.args[0]) if error.args else error
    if isinstance(reason, NewConnectionError):  # urllib3 makes it a kind of timeout; it is a refused connection
        return f"connection error ({type(reason.__context__ or reason).__name__})"
    if isinstance(error, requests.Timeout) or isinstance(reason, (Urllib3Timeout, TimeoutError)):
        return "timeout"
    return f"connection error ({type(reason).__name__})"


def to_uint8_images(images: torch.Tensor) -> list[np.ndarray]:
    """(B, 3, H, W) in [-1, 1] -> B arrays (H, W, 3) uint8, as diffusers' image processor rounds them."""
    x = ((images.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())


class PreviewDecoder:
    """Decodes the sampler's latents with a Tiny AutoEncoder every `every` sampler steps and posts them.

    `for_image(...)` gives the `callback_on_step_end` of one pipeline call (one prompt at one size).
    """

    def __init__(self, folder: str | Path, every: int, poster: WebhookPoster, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        from diffusers import AutoencoderTiny

        self.taesd = AutoencoderTiny.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        self.taesd = self.taesd.to(device).eval().requires_grad_(False)
        self.every, self.poster = every, poster

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, scaling_factor: float, shift_factor: float) -> list[np.ndarray]:
        """Sampler latents (B, 16, h, w), in the SD3 VAE's scaled space, -> images (B, H, W, 3) uint8."""
        raw = latents / scaling_factor + shift_factor  # what the pipeline does before its VAE decodes
        return to_uint8_images(self.taesd.decode(raw.to(self.taesd.dtype)).sample)

    def for_image(self, prompt: str, step: int, size: tuple[int, int], sampler_steps: int):
        """The step callback for one image: previews at sampler steps every, 2*every, ... before the last (the
        last step's image is the final one, which the full VAE decodes)."""

        def callback(pipe, i: int, t, kwargs: dict) -> dict:
            k = i + 1
            if k % self.every == 0 and k < sampler_steps:
                vae = pipe.vae.config
                for image in self.decode(kwargs["latents"], vae.scaling_factor, vae.shift_factor or 0.0):
                    self.poster.post(image, Caption(prompt, step, k, sampler_steps, size))
            return {}

        return callback
