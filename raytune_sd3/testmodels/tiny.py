"""Tiny, randomly initialised Stable Diffusion 3 / 3.5 pipelines, built offline.

Tests, CI and CPU smoke runs need a real ``StableDiffusion3Pipeline`` directory that loads with
``from_pretrained`` but costs nothing to download or run. This module builds one from scratch: every
component has the real SD3 architecture and wiring (three text encoders, 16-channel VAE with /8
downsampling, joint-attention MMDiT) at toy widths, and the tokenizers are trained, reproducibly, on a
small built-in caption corpus. Widths differ per component (CLIP-L 32, CLIP-G 48, T5 96) so that bugs in
the prompt-embedding concatenation or padding show up as shape errors instead of passing silently.

    python -m raytune_sd3.testmodels OUT_DIR [--sd35] [--seed N]     (__main__.py)
"""

from __future__ import annotations

import math
import random
import string
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from raytune_sd3 import atomic
from raytune_sd3.models.layers import tiny_transformer_config
from raytune_sd3.models.loading import tiny_pipeline_dir

_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "brown", "gray")
_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "hexagon")
_OBJECTS = ("cat", "dog", "car", "house", "tree", "flower", "cup", "chair", "apple", "bird", "boat", "lamp")
_SIZES = ("small", "large", "tiny", "big")
_STYLES = (
    "a photo of",
    "a painting of",
    "a drawing of",
    "a pencil sketch of",
    "an illustration of",
    "a watercolor of",
    "an oil painting of",
    "pixel art of",
    "a 3d render of",
)
_SUFFIXES = ("", ", high quality", ", studio lighting", ", soft shadows", ", minimalist", ", detailed, sharp focus")


def _corpus() -> list[str]:
    """A few hundred deterministic captions in the style of the toy datasets (colours, shapes, objects)."""
    rng = random.Random(0)
    lines = [" ".join(_COLOURS + _SHAPES + _OBJECTS + _SIZES + _STYLES + ("on a", "background"))]
    for _ in range(400):
        thing = rng.choice(_SHAPES + _OBJECTS)
        lines.append(
            f"{rng.choice(_STYLES)} a {rng.choice(_SIZES)} {rng.choice(_COLOURS)} {thing} "
            f"on a {rng.choice(_COLOURS)} background{rng.choice(_SUFFIXES)}"
        )
    return lines


def _words(tokenizer: CLIPTokenizer | T5Tokenizer, corpus: list[str]) -> Counter[str]:
    """Corpus word counts, split exactly as ``tokenizer`` splits text before its subword model runs."""
    backend = tokenizer.backend_tokenizer
    normalize = backend.normalizer.normalize_str if backend.normalizer else str
    return Counter(word for line in corpus for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalize(line)))


def _merge(parts: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(parts):
        if parts[i : i + 2] == pair:
            out.append(parts[i] + parts[i + 1])
            i += 2
        else:
            out.append(parts[i])
            i += 1
    return tuple(out)


def _clip_vocab(corpus: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE laid out like CLIP's: alphabet, alphabet + "</w>", merges, then the two special tokens.

    A plain greedy BPE rather than ``train_new_from_iterator``: tokenizers' trainer numbers tokens in hash order,
    so its vocab (hence the token ids) changes from run to run, and nodes building their own copy would disagree.
    """
    splits = {(*word[:-1], word[-1] + "</w>"): n for word, n in _words(CLIPTokenizer(), corpus).items()}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for parts, n in splits.items():
            for pair in pairwise(parts):
                pairs[pair] += n
        if not pairs:  # every corpus word is a single token
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))  # most frequent; ties alphabetical
        merges.append(best)
        splits = {_merge(parts, best): n for parts, n in splits.items()}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = [
        *alphabet,
        *(c + "</w>" for c in alphabet),
        *("".join(m) for m in merges),
        "<|startoftext|>",
        "<|endoftext|>",
    ]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, merges


def _t5_tokenizer(corpus: list[str]) -> T5Tokenizer:
    """Unigram vocab: whole corpus words scored by frequency, then single characters as a (costly) fallback.

    Built directly for the same reason as the CLIP vocab: the unigram trainer's scores vary in the last bits.
    """
    words = _words(T5Tokenizer(), corpus)
    total = sum(words.values())
    pieces = [(word, math.log(n / total)) for word, n in sorted(words.items(), key=lambda wn: (-wn[1], wn[0]))]
    chars = sorted(set("▁" + string.ascii_letters + string.digits + string.punctuation + "".join(words)) - set(words))
    pieces += [(c, math.log(1 / total) - 10.0) for c in chars]
    # T5's layout: <pad>=0, </s>=1, <unk>=2, pieces; the 100 <extra_id_*> sentinels are appended after them.
    tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces])
    tok.model_max_length = 512
    return tok


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """The tiny pipeline's CLIP-L tokenizer (also the tiny CLIP scorer's, testmodels/tiny_validation.py)."""
    vocab, merges = _clip_vocab(_corpus())
    tok = CLIPTokenizer(vocab=vocab, merges=merges)
    tok.model_max_length = 77
    return tok


def _tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer, T5Tokenizer]:
    corpus = _corpus()
    vocab, merges = _clip_vocab(corpus)
    clip_l = CLIPTokenizer(vocab=vocab, merges=merges)
    clip_g = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!")  # real SD3's CLIP-G tokenizer pads with "!"
    for tok in (clip_l, clip_g):
        tok.model_max_length = 77  # the pipeline takes its CLIP sequence length from here
    return clip_l, clip_g, _t5_tokenizer(corpus)


def _clip(tok: CLIPTokenizer, hidden: int, intermediate: int, heads: int = 4) -> CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=3,  # the pipeline reads hidden_states[-2], so keep more than one layer
        num_attention_heads=heads,
        projection_dim=hidden,
        vocab_size=len(tok),
        max_position_embeddings=77,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,  # pooling picks the first eos position
        pad_token_id=tok.pad_token_id,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config)


def _vae() -> AutoencoderKL:
    """A small 16-channel VAE with SD3's /8 and its latent shift and scale."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=(8, 16, 16, 16),  # 4 blocks -> /8 like the real SD3 VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5305,
    )


def _components(sd35: bool, seed: int) -> dict:
    clip_l_tok, clip_g_tok, t5_tok = _tokenizers()
    builders = {
        "transformer": lambda: SD3Transformer2DModel(**tiny_transformer_config("tiny-sd35" if sd35 else "tiny-sd3")),
        "vae": _vae,
        "text_encoder": lambda: _clip(clip_l_tok, hidden=32, intermediate=64),
        "text_encoder_2": lambda: _clip(clip_g_tok, hidden=48, intermediate=96),
        "text_encoder_3": lambda: T5EncoderModel(
            T5Config(
                d_model=96,
                d_kv=16,
                d_ff=128,
                num_layers=2,
                num_heads=4,
                vocab_size=len(t5_tok),
                relative_attention_num_buckets=8,
                feed_forward_proj="gated-gelu",  # as in T5 v1.1 (SD3's T5-XXL)
                decoder_start_token_id=0,
                pad_token_id=t5_tok.pad_token_id,
                eos_token_id=t5_tok.eos_token_id,
            )
        ),
    }
    models = {}
    # Reseed per component so each one's weights depend only on the seed; fork_rng leaves the caller's RNG alone.
    # Always build on CPU (in the default float32) so the weights are the same on any machine.
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        for name, build in builders.items():
            torch.manual_seed(seed)
            models[name] = build()
    return {
        **models,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "tokenizer": clip_l_tok,
        "tokenizer_2": clip_g_tok,
        "tokenizer_3": t5_tok,
    }


def build_tiny_pipeline(out_dir: str | Path, sd35: bool = False, seed: int = 0) -> Path:
    """Write a tiny random SD3 (or SD3.5 with ``sd35``) pipeline to ``out_dir`` and return its path.

    An existing pipeline at ``out_dir`` (one with a ``model_index.json``) is returned untouched; a new one is
    written atomically (``write_atomically``), so concurrent builders are safe.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").exists():
        return out_dir

    def write(tmp: Path) -> None:
        StableDiffusion3Pipeline(**_components(sd35, seed)).save_pretrained(tmp, safe_serialization=True)

    return write_atomically(out_dir, write)


def write_atomically(out_dir: Path, write: Callable[[Path], None], marker: str = "model_index.json") -> Path:
    """Run ``write(tmp)`` on a temp dir next to ``out_dir``, then rename it into place (atomic.write_folder);
    returns ``out_dir``. ``marker`` is the file a finished folder holds.

    Readers never see a half-written folder, and of concurrent builders the loser of the rename discards its copy.
    A folder in the way that is not a model is the user's: refused, never replaced.
    """
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no model (no {marker})")
    with _no_shard_bars():
        return atomic.write_folder(out_dir, write, done=marker)


@contextmanager
def _no_shard_bars():
    """Without transformers' "Writing model shards" bar, one per text encoder: a tiny model's single shard is
    written in milliseconds, and the bars were most of a first run's console."""
    from transformers.utils import logging as transformers_logging

    was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            transformers_logging.enable_progress_bar()


def ensure_tiny_pipeline(name: str) -> Path:
    """Path of the cached tiny pipeline ``name`` ("tiny-sd3" or "tiny-sd35"), building it (seed 0) on first use."""
    return build_tiny_pipeline(tiny_pipeline_dir(name), sd35=name == "tiny-sd35", seed=0)
