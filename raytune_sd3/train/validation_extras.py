"""What rank 0 adds to a validation step when asked: CLIP scores of the images (train/clip_score.py), live
previews during sampling and the final images sent to the webhook (train/previews.py).

Side features: a failure in any of them is warned about once and switches that feature off for the run; the images,
the metrics and the LoRA go on. The models load on first use (the driver resolved their folders: models/loading.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from raytune_sd3.config import ValidationConfig, redact
from raytune_sd3.train.previews import Caption, PreviewDecoder, WebhookPoster


class ValidationExtras:
    """CLIP scorer, preview decoder and webhook poster of one worker (rank 0), each only when configured."""

    def __init__(self, cfg: ValidationConfig, clip_folder: str | None, preview_folder: str | None,
                 device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.clip_folder = clip_folder if cfg.clip_score else None
        self.preview_folder = preview_folder if cfg.preview_steps else None
        self.poster = WebhookPoster(cfg.webhook_url) if cfg.webhook_url and cfg.prompts else None
        self._scorer = self._decoder = None

    def step_callback(self, step: int):
        """`sample_images`' step_callback for training step `step`, or None without previews."""
        if self.preview_folder is None or self.poster is None or self.poster.given_up:
            return None
        try:
            if self._decoder is None:
                self._decoder = PreviewDecoder(self.preview_folder, self.cfg.preview_steps, self.poster, self.device,
                                               self.dtype)
        except Exception as e:  # noqa: BLE001 - previews are a side feature
            self._off("preview_folder", "previews", e)
            return None
        decoder, steps = self._decoder, self.cfg.steps

        def make(prompt: str, size: tuple[int, int]):
            inner = decoder.for_image(prompt, step, size, steps)

            def callback(pipe, i, t, kwargs):
                if self.preview_folder is None:
                    return {}
                try:
                    return inner(pipe, i, t, kwargs)
                except Exception as e:  # noqa: BLE001 - a failed preview never fails the sampling
                    self._off("preview_folder", "previews", e)
                    return {}

            return callback

        return make

    def post_final(self, paths: list[Path], captions: list[tuple[str, tuple[int, int]]], step: int) -> None:
        """Queue each written validation image (the full VAE's) for the webhook, captioned as final: the PNG file's
        bytes as they are (no decode and encode again)."""
        if self.poster is None:
            return
        for path, (prompt, size) in zip(paths, captions, strict=True):
            if path.is_file():
                self.poster.post(path.read_bytes(), Caption(prompt, step, self.cfg.steps, self.cfg.steps, size,
                                                            final=True))

    def clip_scores(self, folder: Path, prompts: list[str]) -> dict[int, float]:
        """Each prompt's CLIP score over the images in `folder` ({} when clip_score is off or failed)."""
        if self.clip_folder is None:
            return {}
        try:
            if self._scorer is None:
                # imported here for start-up time: train.clip_score loads torch
                from raytune_sd3.train.clip_score import ClipScorer

                self._scorer = ClipScorer(self.clip_folder, self.device)
            return self._scorer.score_folder(folder, prompts)
        except Exception as e:  # noqa: BLE001 - the score is a side feature: training and the images go on
            self._off("clip_folder", "CLIP scores", e)
            return {}

    def close(self) -> None:
        if self.poster is not None:
            self.poster.close()

    def _off(self, attr: str, what: str, error: Exception) -> None:
        setattr(self, attr, None)
        print(redact(f"raytune_sd3: warning: validation {what} failed and are off for this run: "
                     f"{type(error).__name__}: {error}"), flush=True)
