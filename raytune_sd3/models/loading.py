"""Loading SD3 components from a diffusers directory, a hub id (local cache) or a tiny offline model by name.

One path for all three, so the tiny model used by the tests exercises the same code the real SD3.5 does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from raytune_sd3.config import TINY_MODELS, JobConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def leave_out_bitsandbytes() -> None:
    """In a Ray actor (a training worker, an encoder) whose job uses no bitsandbytes part (JobConfig.
    bitsandbytes_parts): make `import bitsandbytes` fail as if it were not installed, unless something loaded it
    already. peft.helpers imports it whenever it is installed, and diffusers' hooks import peft.helpers: about 1.4 s
    of CPU per process on 2 cores (diffusers + peft: 7.3 -> 5.9 s) and, without CUDA, a look for its kernels on the
    Hub. peft, diffusers, transformers and accelerate take a None in sys.modules as not installed (find_spec says
    None). Never in the driver's process, where a later job may need it (Train's local mode runs the loop there)."""
    import ray

    if "bitsandbytes" in sys.modules or not ray.is_initialized():
        return
    if ray.get_runtime_context().get_actor_id() is not None:
        sys.modules["bitsandbytes"] = None


def tiny_models_root() -> Path:
    """Where tiny models are built: under RAYTUNE_SD3_HOME, else ~/.cache/raytune_sd3."""
    return Path(os.environ.get("RAYTUNE_SD3_HOME", "~/.cache/raytune_sd3")).expanduser() / "models"


def tiny_pipeline_dir(name: str) -> Path:
    """Where the tiny pipeline `name` is built (tiny_models_root)."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny pipeline {name!r}; expected one of {TINY_MODELS}")
    return tiny_models_root() / name


def _local_dir(pretrained: str) -> Path | None:
    p = Path(pretrained).expanduser()
    return p if p.is_dir() else None


def component_identity(pretrained: str, subfolder: str, revision: str | None = None) -> str:
    """A short hash naming one component's exact weights (config + weight file names, sizes and head bytes).

    Goes into cache keys: a different VAE or text encoder never reuses another's cached outputs.
    """
    h = hashlib.sha256(f"{subfolder}".encode())
    folder = _component_dir(pretrained, subfolder, revision)
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

    with _position_table_from_checkpoint(_component_dir(pretrained, "transformer", revision, cached_only=True)):
        model = SD3Transformer2DModel.from_pretrained(pretrained, subfolder="transformer", torch_dtype=dtype,
                                                      revision=revision)
    return model.requires_grad_(False)


POSITION_TABLE = "pos_embed.pos_embed"  # SD3's sin-cos position table: a buffer its checkpoints hold


def _component_dir(pretrained: str, subfolder: str, revision: str | None, cached_only: bool = False) -> Path | None:
    """The local folder of one component: in a model folder, or in the HF cache (downloaded there unless
    `cached_only`, which gives None for a component not there)."""
    root = _local_dir(pretrained)
    if root is None:
        from huggingface_hub import snapshot_download

        try:
            root = Path(snapshot_download(pretrained, revision=revision, allow_patterns=[f"{subfolder}/*"],
                                          local_files_only=cached_only))
        except Exception:
            if not cached_only:
                raise
            return None  # not in the cache yet: from_pretrained fetches it as usual
    folder = root / subfolder
    return folder if folder.is_dir() or not cached_only else None


@contextlib.contextmanager
def _position_table_from_checkpoint(folder: Path | None):
    """Skip computing the position table that the checkpoint then overwrites.

    diffusers' PatchEmbed computes SD3's table in float64 when it is built (pos_embed_max_size^2 x width: 147,456 x
    1,536 for SD3.5 Medium, 1.7 s and 1.8 GB on a 2-core CPU; 0.8 s and 0.7 GB for Large), in every worker that
    loads the transformer. Where the checkpoint holds the table, the model is built with a meta placeholder that
    loading replaces (were it not replaced, the first forward would fail on the meta tensor: never garbage).
    """
    from diffusers.models import embeddings
    from safetensors import safe_open

    def holds_table(file: Path) -> bool:
        with safe_open(file, "pt") as weights:  # reads the header only
            return POSITION_TABLE in weights.keys()

    compute = getattr(embeddings, "get_2d_sincos_pos_embed", None)
    if compute is None or folder is None or not any(holds_table(f) for f in folder.glob("*.safetensors")):
        yield
        return

    def placeholder(embed_dim, grid_size, *args, output_type="pt", **kwargs):
        if output_type != "pt" or args or kwargs.get("cls_token") or kwargs.get("extra_tokens"):
            return compute(embed_dim, grid_size, *args, output_type=output_type, **kwargs)
        h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        return torch.empty(h * w, embed_dim, device="meta")

    embeddings.get_2d_sincos_pos_embed = placeholder
    try:
        yield
    finally:
        embeddings.get_2d_sincos_pos_embed = compute


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


def compile_blocks(transformer, mode: str | None = None) -> int:
    """torch.compile each transformer block in place (regional compilation); returns how many.

    The blocks of a kind share one compiled graph (torch >= 2.5 treats a module's parameters as graph inputs), so
    compiling SD3.5 Large costs about what one block costs, not 38; the embeddings, the norm-out and the loss stay
    eager. In place: parameter names, checkpoints and the saved LoRA are unchanged. Each bucket shape compiles once.
    """
    _let_dynamo_trace_dora()
    for block in transformer.transformer_blocks:
        block.compile(mode=mode)  # mode "reduce-overhead": CUDA graphs (benchmarks/gpu.py's compile-graphs lever)
    return len(transformer.transformer_blocks)


@functools.cache
def _let_dynamo_trace_dora() -> None:
    """peft's DoRA layers fetch their base weight through `dequantize_module_weight`, which tests
    `type(weight).__module__.startswith("torchao.")`: Dynamo (torch 2.13) cannot trace that, so each DoRA layer broke
    the compiled block's graph (39 breaks and 41 compiles on the 2-block tiny model, against 2 graphs for LoRA). While
    Dynamo traces, a plain weight is returned as it is, which is what peft returns for one; a quantised weight
    still takes peft's own function, run eagerly (a graph break, as before). Eager calls are not affected."""
    from peft.utils import integrations

    peft_weight = integrations.dequantize_module_weight
    peft_weight_eager = torch.compiler.disable(peft_weight)

    @torch.compiler.substitute_in_graph(peft_weight)
    def dequantize_module_weight(module: torch.nn.Module) -> torch.nn.Parameter:
        weight = module.weight
        if type(weight) is torch.nn.Parameter and not hasattr(module, "W_q"):  # W_q: an HQQ layer
            return weight
        return peft_weight_eager(module)


# --- validation's extra models (CLIP score, previews) ------------------------------------------------------------

# validation key -> (the switch that needs it, the default hub id, the tiny stand-in used with a tiny pipeline)
VALIDATION_MODELS = {
    "clip_model": ("clip_score", "openai/clip-vit-large-patch14", "tiny-clip"),
    "preview_model": ("preview_steps", "madebyollin/taesd3", "tiny-taesd3"),
}


def validation_model_name(cfg: JobConfig, key: str) -> str | None:
    """What validation.<key> ("clip_model", "preview_model") names for this job: the configured value, else the
    tiny stand-in with a tiny pipeline, else the default hub id; None when the feature that needs it is off."""
    switch, default, tiny = VALIDATION_MODELS[key]
    v = cfg.validation
    if not getattr(v, switch) or not v.prompts:
        return None
    return getattr(v, key) or (tiny if cfg.model.pretrained in TINY_MODELS else default)


def local_model_dir(name: str) -> Path | None:
    """The folder holding `name` (a folder, or a hub id already in the local HF cache); None when it is neither.
    Tiny stand-ins are not looked up here (resolve_validation_model builds them)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:  # the cache only: a run never downloads these
        found = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, or not a valid repo id: either way not here
        return None
    return found if (found / "config.json").is_file() else None


def validation_model_problem(cfg: JobConfig, key: str) -> str | None:
    """Why validation.<key> cannot load on this machine (checked before Ray starts), or None."""
    name = validation_model_name(cfg, key)
    if name is None or name == VALIDATION_MODELS[key][2] or local_model_dir(name) is not None:
        return None
    switch = VALIDATION_MODELS[key][0]
    return (f"validation.{key}: {name} is neither a folder nor in the local Hugging Face cache (validation.{switch} "
            f"needs it, and a run never downloads it): download it once with `hf download {name}` (on every node, "
            f"or into a shared HF_HOME), point validation.{key} at a folder, or turn validation.{switch} off")
