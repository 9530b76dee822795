"""Real-size SD3.5 pipelines with random weights, built offline, for GPU benchmarks and smoke runs at the real
transformer's size without downloading (or accepting the licence of) Stability's weights.

    python -m raytune_sd3.testmodels OUT --shape sd35-large     (or sd35-medium; --device cuda|cpu|meta)

- The transformer is the hub model's architecture (its config.json: models/catalogue.py) with random bf16
  weights, PyTorch's default init, made on the GPU when there is one. It is made and written one block at a time
  (one safetensors shard each, plus one for the embeddings and output layers, and the index diffusers reads), so
  neither the device nor host RAM holds more than one block: SD3.5 Large is 16 GB of bf16 on disk.
- The text encoders are narrow (3 layers, small feed-forward, few T5 heads) with the real output widths: CLIP-L
  768 and CLIP-G 1280 (penultimate states concatenate to 2048, pooled 768 + 1280 = 2048) and T5 4096, so prompt
  embeddings are (77 + L) x 4096 as with SD3.5. The VAE is SD3's architecture (83.8M parameters, 16 latent
  channels, its latent shift and scale), so caching and validation decode cost what they do with the real one;
  the tokenizers are the tiny pipeline's. These parts are made on the CPU and kept in fp32.
- `--device meta` is a dry run: every file but the transformer's weight shards (its index still lists them).

The folder has the diffusers layout of the tiny pipeline: models/loading.py and StableDiffusion3Pipeline load it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file
from torch import nn
from transformers import T5Config, T5EncoderModel

from raytune_sd3.models.catalogue import KNOWN_TRANSFORMERS
from raytune_sd3.testmodels.tiny import _clip, _tokenizers, write_atomically

SHAPES = {"sd35-large": "stabilityai/stable-diffusion-3.5-large",
          "sd35-medium": "stabilityai/stable-diffusion-3.5-medium"}
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"  # the name diffusers looks for


def transformer_config(shape: str) -> dict:
    """The hub model's transformer/config.json for a shape name (sd35-large, sd35-medium)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    return dict(KNOWN_TRANSFORMERS[SHAPES[shape]])


def sd3_vae() -> AutoencoderKL:
    """SD3's (and SD3.5's) VAE architecture with random weights: memory.SD3_VAE_PARAMS parameters."""
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         layers_per_block=2, norm_num_groups=32, sample_size=1024, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305)


def _small_components(seed: int) -> dict:
    """Tokenizers, narrow text encoders of the real widths, SD3's VAE and the scheduler (fp32)."""
    clip_l_tok, clip_g_tok, t5_tok = _tokenizers()
    builders = {
        "text_encoder": lambda: _clip(clip_l_tok, hidden=768, intermediate=256, heads=12),  # CLIP-L: 768
        "text_encoder_2": lambda: _clip(clip_g_tok, hidden=1280, intermediate=256, heads=20),  # CLIP-G: 1280
        "text_encoder_3": lambda: T5EncoderModel(T5Config(
            d_model=4096, d_kv=64, d_ff=256, num_layers=2, num_heads=4,  # T5-XXL's width, little else
            vocab_size=len(t5_tok), relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
            decoder_start_token_id=0, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)),
        "vae": sd3_vae,
    }
    models = {}
    with torch.device("cpu"):
        for name, build in builders.items():
            torch.manual_seed(seed)
            models[name] = build()
    return {**models, "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
            "tokenizer": clip_l_tok, "tokenizer_2": clip_g_tok, "tokenizer_3": t5_tok}


@torch.no_grad()
def _default_init(module: nn.Module) -> None:
    """The init constructing `module` would have given, after `to_empty`: each layer's reset_parameters (PyTorch's
    default), and one for the weight of diffusers' RMSNorm, which has none."""
    done = set()
    for m in module.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
            done.update(id(p) for p in m.parameters(recurse=False))
    for name, p in module.named_parameters():
        if id(p) in done:
            continue
        owner = module.get_submodule(name.rpartition(".")[0])
        if type(owner).__name__ == "RMSNorm" and name.endswith(".weight"):
            p.fill_(1.0)
        else:  # a layer this builder does not know: fail rather than write uninitialised memory
            raise RuntimeError(f"{name} ({type(owner).__name__}): no known initialisation")
    if next(module.buffers(), None) is not None:
        raise RuntimeError(f"{type(module).__name__} has buffers, which to_empty leaves uninitialised")


def write_transformer(folder: Path, config: dict, device: str, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16) -> int:
    """Write an SD3Transformer2DModel of `config` with random weights in `dtype` to `folder`: config.json, one
    shard for everything outside the blocks, one per block, and their index. Returns the bytes of the weights.

    On "meta" no weights are made and no shard is written (config.json and the index are)."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = SD3Transformer2DModel.from_config(config)  # names and shapes; the blocks are made from it
    model.save_config(folder)
    blocks = model.transformer_blocks
    names = [f"diffusion_pytorch_model-{i:05d}-of-{len(blocks) + 1:05d}.safetensors" for i in range(1, len(blocks) + 2)]
    weight_map: dict[str, str] = {}
    total = 0

    def write(state: dict[str, torch.Tensor], file: str) -> None:
        nonlocal total
        for key, t in state.items():
            weight_map[key] = file
            total += t.numel() * dtype.itemsize
        if device != "meta":
            save_file({k: t.to(dtype).contiguous().cpu() for k, t in state.items()}, folder / file,
                      metadata={"format": "pt"})

    torch.manual_seed(seed)
    if device == "meta":
        write({k: t for k, t in model.state_dict().items() if not k.startswith("transformer_blocks.")}, names[0])
    else:
        # Outside the blocks diffusers builds it (the sin-cos position table is computed, not drawn): a 0-block
        # model has exactly those tensors.
        with torch.device(device):
            outer = SD3Transformer2DModel.from_config({**config, "num_layers": 0})
        write(outer.state_dict(), names[0])
        del outer
    for i, block in enumerate(blocks):
        if device != "meta":
            block.to_empty(device=device)
            _default_init(block)
        write({f"transformer_blocks.{i}.{k}": t for k, t in block.state_dict().items()}, names[i + 1])
        block.to_empty(device="meta")  # frees it before the next one is made
    (folder / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2, sort_keys=True) + "\n")
    return total


def _complete(out_dir: Path) -> bool:
    """A built pipeline with every shard its transformer index lists (a dry run has none)."""
    index = out_dir / "transformer" / WEIGHTS_INDEX
    if not (out_dir / "model_index.json").exists() or not index.exists():
        return False
    files = set(json.loads(index.read_text())["weight_map"].values())
    if all((index.parent / f).exists() for f in files):
        return True
    raise FileExistsError(f"{out_dir} holds a pipeline without its transformer weights (a --device meta dry run); "
                          "delete it or build into another folder")


def build_shaped_pipeline(out_dir: str | Path, shape: str | dict, device: str | None = None, seed: int = 0) -> Path:
    """Write a pipeline whose transformer has the shape `shape` (a SHAPES name, or a transformer config dict) and
    random bf16 weights to `out_dir`; returns it. `device`: where the weights are made (default cuda when there
    is one, else cpu; meta: a dry run). A complete pipeline already there is returned untouched."""
    config = transformer_config(shape) if isinstance(shape, str) else dict(shape)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU here; use --device cpu (slower) or meta (a dry run)")
    out_dir = Path(out_dir)
    if _complete(out_dir):
        return out_dir

    def write(tmp: Path) -> None:
        cuda = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):  # the caller's random state is left alone
            pipe = StableDiffusion3Pipeline(transformer=None, **_small_components(seed))
            verbosity = diffusers_logging.get_verbosity()
            diffusers_logging.set_verbosity_error()  # "transformer=None cannot be saved": it is written below
            try:
                pipe.save_pretrained(tmp, safe_serialization=True)
            finally:
                diffusers_logging.set_verbosity(verbosity)
            write_transformer(tmp / "transformer", config, device, seed)
        index = json.loads((tmp / "model_index.json").read_text())
        index["transformer"] = ["diffusers", "SD3Transformer2DModel"]  # the pipeline was saved without it
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    return write_atomically(out_dir, write)
