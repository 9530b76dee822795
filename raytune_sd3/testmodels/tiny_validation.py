"""Tiny random models for validation's extras, built offline like the tiny pipeline (testmodels/tiny.py): a CLIP (text
and vision towers) for `validation.clip_score` and a 16-channel Tiny AutoEncoder for `validation.preview_steps`.

They make the demo job and the tests able to turn both features on without a download. Random weights score and
decode nonsense, but through exactly the code the real models (openai/clip-vit-large-patch14, madebyollin/taesd3)
go through. Each is built on the CPU with a fixed seed, so every node builds the same bytes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raytune_sd3.testmodels.tiny import tiny_clip_tokenizer, write_atomically

CLIP_IMAGE_SIZE = 32  # the tiny CLIP's input (real CLIP-L: 224)


def _seeded(build, seed: int):
    with torch.random.fork_rng(devices=[]), torch.device("cpu"):
        torch.manual_seed(seed)
        return build()


def tiny_clip_parts(seed: int = 0):
    """(CLIPModel, CLIPProcessor): text tower on the tiny pipeline's CLIP tokenizer, a 32 px vision tower."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tiny_clip_tokenizer()
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "vocab_size": len(tok), "max_position_embeddings": 77, "bos_token_id": tok.bos_token_id,
                     "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": CLIP_IMAGE_SIZE, "patch_size": 8},
        projection_dim=16,
    )
    # The PIL image processor: the default one needs torchvision, which we keep out (DESIGN.md).
    images = CLIPImageProcessorPil(size={"shortest_edge": CLIP_IMAGE_SIZE},
                                   crop_size={"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE})
    return _seeded(lambda: _aligned(CLIPModel(config)), seed), CLIPProcessor(image_processor=images, tokenizer=tok)


@torch.no_grad()
def _aligned(model):
    """Give both towers one projection and one final-norm bias. A random CLIP's image-text cosines have a random
    sign, so most scores would be the clamp's 0; with a shared offset they land in the tens and still move with
    the image and the prompt (the demo's curve shows something)."""
    bias = torch.randn(model.config.vision_config.hidden_size) * 1.5
    model.vision_model.post_layernorm.bias.copy_(bias)
    model.text_model.final_layer_norm.bias.copy_(bias)
    model.text_projection.weight.copy_(model.visual_projection.weight)
    return model


def tiny_taesd(seed: int = 0):
    """An AutoencoderTiny with SD3's 16 latent channels, /8, and SD3's latent shift and scale (as taesd3's config)."""
    from diffusers import AutoencoderTiny

    return _seeded(lambda: AutoencoderTiny(
        latent_channels=16, encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), shift_factor=0.0609, scaling_factor=1.5305,
    ), seed)


def build_tiny_clip(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny CLIP (model + processor) to `out_dir` unless one is there; returns the folder."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir

    def write(tmp: Path) -> None:
        model, processor = tiny_clip_parts(seed)
        processor.save_pretrained(tmp)
        model.save_pretrained(tmp)  # config.json last: its presence marks a whole folder

    return write_atomically(out_dir, write, marker="config.json")


def build_tiny_taesd(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny Tiny AutoEncoder to `out_dir` unless one is there; returns the folder."""
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    return write_atomically(out_dir, lambda tmp: tiny_taesd(seed).save_pretrained(tmp), marker="config.json")
