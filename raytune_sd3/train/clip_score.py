"""CLIP score of validation images: how well each image matches its prompt, by a CLIP model.

    CLIPScore(image, prompt) = 100 * max(cos(E_image(image), E_text(prompt)), 0)

the definition of Hessel et al. (2021) as torchmetrics' CLIPScore computes it (projected embeddings, no logit
scale). Runs on rank 0 after the validation images are written; the model is loaded once per worker, from a folder
(the driver resolved the hub id in the local cache, or built the tiny CLIP: models/loading.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image


class ClipScorer:
    """A CLIP model and its processor, loaded from `folder` (no download), scoring (image, prompt) pairs."""

    def __init__(self, folder: str | Path, device: torch.device | str = "cpu"):
        from transformers import AutoProcessor, CLIPModel

        self.device = torch.device(device)
        # fp32 whatever the run's dtype: the score is a cosine in [0, 100] compared across steps
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.max_tokens = self.model.config.text_config.max_position_embeddings

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """One score per (image, prompt) pair, in order; prompts longer than CLIP's 77 tokens are truncated."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return []
        text = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_tokens,
                                        return_tensors="pt").to(self.device)
        pixels = self.processor.image_processor([im.convert("RGB") for im in images],
                                                return_tensors="pt")["pixel_values"].to(self.device)
        image_emb = self.model.get_image_features(pixel_values=pixels).pooler_output
        text_emb = self.model.get_text_features(**text).pooler_output
        cosine = torch.nn.functional.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
        return (100 * cosine.clamp(min=0)).tolist()

    def score_folder(self, folder: Path, prompts: list[str]) -> dict[int, float]:
        """Each prompt's mean score over its images in `folder` (NN_WxH.png: prompt NN at WxH, as sample_images
        writes them), keyed by the prompt's index."""
        pngs = [(int(p.stem.partition("_")[0]), p) for p in sorted(folder.glob("*.png"))
                if p.stem.partition("_")[0].isdigit() and int(p.stem.partition("_")[0]) < len(prompts)]
        images = []
        for _, p in pngs:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        scores = self.score(images, [prompts[i] for i, _ in pngs])
        per_prompt: dict[int, list[float]] = {}
        for (i, _), s in zip(pngs, scores, strict=True):
            per_prompt.setdefault(i, []).append(s)
        return {i: sum(v) / len(v) for i, v in sorted(per_prompt.items())}
