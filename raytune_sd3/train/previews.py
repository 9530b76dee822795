"""Live validation previews: the sampler's latents decoded every N steps by a Tiny AutoEncoder, posted to a webhook.

    sampler step k (k % N == 0) -> latents -> (latents / scale + shift) -> AutoencoderTiny.decode -> PNG
        -> bounded queue -> background thread -> multipart POST (payload_json + files[0], as Discord takes it)

The sampler only decodes and copies to the host (milliseconds with a TAESD); PNG encoding and the network run in
one background thread, so a slow webhook never holds the GPU. The queue is bounded: when the webhook falls behind,
new previews are dropped (and said so once), never queued without end. The network never stops training: each
POST has a timeout and a few retries, each kind of failure is warned about once, and a webhook that refuses us
(a 4xx other than 429: a wrong or revoked URL) is given up on for the rest of the run. The URL holds a token:
messages show its scheme and host only.
"""

from __future__ import annotations

import io
import json
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import torch

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


def multipart_body(payload: dict, filename: str, png: bytes) -> tuple[bytes, str]:
    """(body, Content-Type) of a multipart/form-data POST: `payload_json` and the PNG as `files[0]`."""
    boundary = f"raytune-sd3-{uuid.uuid4().hex}"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"payload_json\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(payload)}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"files[0]\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/png\r\n\r\n")
    body = head.encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


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

    `timeout` seconds per attempt, `attempts` tries per image (waits of `backoff` x 1, 2, 4...; a 429's
    Retry-After up to `max_wait`), at most `queue_size` images waiting. `warn` gets one message per kind of failure.
    """

    def __init__(self, url: str, *, timeout: float = 10.0, attempts: int = 3, backoff: float = 1.0,
                 max_wait: float = 10.0, queue_size: int = 16, warn: Callable[[str], None] = _warn):
        self.url, self.timeout, self.attempts, self.backoff, self.max_wait = url, timeout, attempts, backoff, max_wait
        self._warn, self.warned = warn, set()
        self.sent = self.failed = self.dropped = 0
        self.given_up = False
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
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
        while (item := self._queue.get()) is not None:
            if self.given_up:
                continue
            image, caption = item
            try:
                png = image if isinstance(image, bytes) else png_bytes(image)
                body, content_type = multipart_body(caption.payload(), caption.filename, png)
            except Exception as e:  # noqa: BLE001 - a bad image is this image's problem, not the run's
                self.failed += 1
                self._warn_once(f"encoding ({type(e).__name__})", "an image could not be encoded as PNG")
                continue
            if self._send(body, content_type):
                self.sent += 1
            else:
                self.failed += 1

    def _send(self, body: bytes, content_type: str) -> bool:
        kind = ""
        for attempt in range(self.attempts):
            wait = self.backoff * 2 ** attempt
            request = urllib.request.Request(self.url, data=body, method="POST", headers={
                "Content-Type": content_type, "User-Agent": "raytune_sd3 (validation previews)"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    response.read()
                return True
            except urllib.error.HTTPError as e:
                if e.code == 429:
                    kind = "HTTP 429 (rate limited)"
                    wait = _retry_after(e, default=wait)
                elif e.code >= 500:
                    kind = f"HTTP {e.code}"
                else:  # 4xx: the URL is wrong or revoked; retrying will not change that
                    self.given_up = True
                    self._warn_once(f"HTTP {e.code}", "it refused the post; no more previews are sent this run "
                                                      "(check validation.webhook_url)")
                    return False
            except TimeoutError:
                kind = "timeout"
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                kind = "timeout" if isinstance(reason, TimeoutError) else f"connection error ({type(reason).__name__})"
            if attempt + 1 < self.attempts:
                time.sleep(min(wait, self.max_wait))
        self._warn_once(kind, f"an image was not delivered after {self.attempts} attempts")
        return False

    def _warn_once(self, kind: str, what: str) -> None:
        if kind in self.warned:
            return
        self.warned.add(kind)
        self._warn(f"validation webhook {shown_url(self.url)}: {kind}: {what}. Training goes on; further "
                   f"'{kind}' failures are not reported.")


def _retry_after(error: urllib.error.HTTPError, default: float) -> float:
    """Seconds a 429 asks us to wait: Retry-After, or Discord's JSON `retry_after`."""
    try:
        return float(error.headers.get("Retry-After") or json.loads(error.read() or b"{}").get("retry_after"))
    except (TypeError, ValueError):
        return default


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
