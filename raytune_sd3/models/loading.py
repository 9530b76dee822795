"""Loading SD3 components from a diffusers directory, a hub id (local cache) or a tiny offline model by name.

One path for all three, so the tiny model used by the tests exercises the same code the real SD3.5 does.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from raytune_sd3.config import TINY_MODELS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tiny_pipeline_dir(name: str) -> Path:
    """Where the tiny pipeline `name` is built: under RAYTUNE_SD3_HOME, else ~/.cache/raytune_sd3."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny pipeline {name!r}; expected one of {TINY_MODELS}")
    return Path(os.environ.get("RAYTUNE_SD3_HOME", "~/.cache/raytune_sd3")).expanduser() / "models" / name


def resolve_pretrained(pretrained: str) -> str:
    """A tiny model name becomes its built directory (built on first use); anything else passes through."""
    if pretrained in TINY_MODELS:
        built = tiny_pipeline_dir(pretrained)
        if (built / "model_index.json").exists():
            return str(built)  # without importing the builder, whose diffusers import costs the driver ~7 s
        from raytune_sd3.models.tiny import ensure_tiny_pipeline

        return str(ensure_tiny_pipeline(pretrained))
    return pretrained


def _local_dir(pretrained: str) -> Path | None:
    p = Path(pretrained).expanduser()
    return p if p.is_dir() else None


def component_identity(pretrained: str, subfolder: str, revision: str | None = None) -> str:
    """A short hash naming one component's exact weights (config + weight file names, sizes and head bytes).

    Goes into cache keys: a different VAE or text encoder never reuses another's cached outputs.
    """
    h = hashlib.sha256(f"{subfolder}".encode())
    root = _local_dir(pretrained)
    if root is None:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(pretrained, revision=revision, allow_patterns=[f"{subfolder}/*"]))
    folder = root / subfolder
    for f in sorted(folder.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            with open(f, "rb") as fh:  # the head holds safetensors' header (names, shapes, offsets) and first weights
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


@dataclass
class TextEncoders:
    """CLIP-L, CLIP-G and T5 with their tokenizers (diffusers' text_encoder, _2, _3)."""

    tokenizers: list
    encoders: list

    @property
    def device(self) -> torch.device:
        return next(self.encoders[0].parameters()).device


def check_tokenizer(tokenizer, encoder, name: str) -> None:
    """Offline hub loads can silently return a 2-token tokenizer: refuse one that does not fit its encoder."""
    n, vocab = len(tokenizer), encoder.config.vocab_size
    if not (0.5 * vocab <= n <= vocab):
        raise RuntimeError(
            f"{name}: tokenizer has {n} tokens but its text encoder expects {vocab}; the tokenizer files are missing "
            "or wrong (an offline hub cache without tokenizer files gives this). Download the full model folder."
        )


def load_text_encoders(pretrained: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       revision: str | None = None) -> TextEncoders:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    kw = {"revision": revision}
    toks, encs = [], []
    for sub_tok, sub_enc, cls in [
        ("tokenizer", "text_encoder", CLIPTextModelWithProjection),
        ("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection),
        ("tokenizer_3", "text_encoder_3", T5EncoderModel),
    ]:
        tok = AutoTokenizer.from_pretrained(pretrained, subfolder=sub_tok, **kw)
        enc = cls.from_pretrained(pretrained, subfolder=sub_enc, torch_dtype=dtype, **kw).to(device).eval()
        enc.requires_grad_(False)
        check_tokenizer(tok, enc, f"{pretrained}/{sub_tok}")
        toks.append(tok)
        encs.append(enc)
    return TextEncoders(toks, encs)


def load_vae(pretrained: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             revision: str | None = None):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae", torch_dtype=dtype, revision=revision)
    return vae.to(device).eval().requires_grad_(False)


def load_transformer(pretrained: str, dtype: torch.dtype = torch.float32, revision: str | None = None):
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer", torch_dtype=dtype,
                                                  revision=revision)
    return model.requires_grad_(False)


def load_sampler(pretrained: str, revision: str | None = None):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(pretrained, subfolder="scheduler", revision=revision)


def vae_scaling(pretrained: str, revision: str | None = None) -> tuple[float, float]:
    """(shift_factor, scaling_factor) from the VAE's config without loading its weights."""
    root = _local_dir(pretrained)
    if root is not None:
        cfg = json.loads((root / "vae" / "config.json").read_text())
    else:
        from diffusers import AutoencoderKL

        cfg = AutoencoderKL.load_config(pretrained, subfolder="vae", revision=revision)
    return float(cfg.get("shift_factor") or 0.0), float(cfg["scaling_factor"])


def compile_blocks(transformer) -> int:
    """torch.compile each transformer block in place (regional compilation); returns how many.

    The blocks of a kind share one compiled graph (torch >= 2.5 treats a module's parameters as graph inputs), so
    compiling SD3.5 Large costs about what one block costs, not 38; the embeddings, the norm-out and the loss stay
    eager. In place: parameter names, checkpoints and the saved LoRA are unchanged. Each bucket shape compiles once.
    """
    for block in transformer.transformer_blocks:
        block.compile()
    return len(transformer.transformer_blocks)
