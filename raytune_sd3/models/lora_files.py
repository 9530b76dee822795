"""Reading an SD3 LoRA file to start from (lora.init_from): what it holds (kind, rank, alpha, layers) and its
tensors under peft's names, loaded into the adapter that add_lora made.

Accepted: the layouts diffusers' SD3 loader accepts (StableDiffusion3Pipeline.load_lora_weights), read with its own
key conversion: ours, diffusers' and SimpleTuner's or ai-toolkit's (`transformer.<module>.lora_A.weight`, alpha
in the header's `lora_adapter_metadata` or as `.alpha` tensors), a peft save (`base_model.model.` prefix) and
diffusers' older `.lora.down/.up` names. diffusers has no converter for SD3 files in kohya sd-scripts' MMDiT layout
(`lora_unet_joint_blocks_N_...`, fused qkv), for LyCORIS (`lycoris_...`, `.lokr_`, `.hada_`) or for kohya's DoRA
(`dora_scale`), so neither have we: those are refused with the reason (a LoKr / LoHa run, lora.kind lokr | loha,
starts its adapter fresh; resuming one reads its own checkpoint, not this).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raytune_sd3.config import JobConfig, adapter_problem
from raytune_sd3.models.lora import LORA_FILE

_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector")
_FOREIGN = {  # key marker -> what the file is, for the refusal
    "lora_unet_": "kohya sd-scripts' MMDiT layout (lora_unet_joint_blocks_..., fused qkv)",
    "lora_te": "kohya's text-encoder LoRA",
    "lycoris_": "a LyCORIS adapter",
    ".lokr_": "a LyCORIS LoKr adapter",
    ".hada_": "a LyCORIS LoHa adapter",
    "dora_scale": "kohya's DoRA layout (dora_scale)",
}


class LoraFileError(ValueError):
    """A file that cannot start this run's LoRA; the message says what it is and what to do."""


@dataclass
class LoraFile:
    """An SD3 transformer LoRA read from `path`: `tensors` under peft's names (`<module>.lora_A.weight`, ...)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    kind: str  # lora | dora
    rank: int
    alpha: float
    modules: list[str]  # the transformer's linears it adapts, sorted


def lora_file_path(location: str | Path) -> Path:
    """The file of `location`: itself, or a folder's pytorch_lora_weights.safetensors (else its one .safetensors)."""
    path = Path(location)
    if not path.is_dir():
        return path
    if (path / LORA_FILE).is_file():
        return path / LORA_FILE
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise LoraFileError(f"{path} is a folder without {LORA_FILE}"
                            + (f" and with {len(found)} other .safetensors files: name one" if found else ""))
    return found[0]


def read_lora_file(location: str | Path) -> LoraFile:
    """Read and describe the LoRA at `location` (file or folder); LoraFileError if it is not an SD3 transformer
    LoRA that this trainer can continue."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from safetensors import SafetensorError, safe_open

    path = lora_file_path(location)
    if not path.is_file():
        raise LoraFileError(f"{path} is not a file")
    try:
        with safe_open(str(path), "pt") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
            header = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise LoraFileError(f"{path} is not a readable .safetensors file ({e})") from None
    for marker, what in _FOREIGN.items():
        if any(marker in k for k in raw) and "LyCORIS" in what:
            raise LoraFileError(f"{path} is {what}: lora.init_from continues a LoRA or DoRA only (a lora.kind lokr "
                                "or loha run starts its adapter fresh); remove lora.init_from")
        if any(marker in k for k in raw):
            raise LoraFileError(f"{path} is {what}, which diffusers' SD3 loader cannot convert and so neither can "
                                "raytune_sd3: start from a LoRA in diffusers' layout (transformer.<layer>.lora_A.weight)")
    text_encoders = sorted({k.split(".")[0] for k in raw if k.startswith(("text_encoder", "te_", "te1", "te2"))})
    if text_encoders:
        raise LoraFileError(f"{path} also adapts the text encoders ({', '.join(text_encoders)}); raytune_sd3 trains "
                            "the transformer only, so a run from it would drop them: start from a transformer-only LoRA")
    alphas = {k.removesuffix(".alpha"): float(v) for k, v in raw.items() if k.endswith(".alpha")}
    tensors = {_strip(k): v for k, v in raw.items() if not k.endswith(".alpha")}
    if tensors and not any("lora_A" in k for k in tensors):  # diffusers' own check before its conversion
        tensors = convert_unet_state_dict_to_peft(tensors)
    other = sorted(k for k in tensors if not k.endswith(_SUFFIXES))
    if not tensors or other:
        raise LoraFileError(f"{path} is not an SD3 LoRA in diffusers' layout: "
                            + (f"keys such as {other[:3]} are not LoRA weights" if other else "it holds no tensors"))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    ranks = {tensors[f"{m}.lora_A.weight"].shape[0] for m in modules if f"{m}.lora_A.weight" in tensors}
    halves = [m for m in modules if f"{m}.lora_A.weight" not in tensors or f"{m}.lora_B.weight" not in tensors]
    if halves or len(ranks) != 1:
        raise LoraFileError(f"{path}: " + (f"{halves[:3]} lack lora_A or lora_B" if halves else
                            f"its layers have different ranks {sorted(ranks)}; raytune_sd3 trains one rank"))
    rank = ranks.pop()
    return LoraFile(path, tensors, "dora" if any(k.endswith("magnitude_vector") for k in tensors) else "lora",
                    rank, _alpha(path, header, alphas, rank), modules)


def _strip(key: str) -> str:
    for prefix in ("transformer.", "base_model.model."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _alpha(path: Path, header: dict, alphas: dict[str, float], rank: int) -> float:
    """LoRA alpha: the header's peft config (diffusers' `lora_adapter_metadata`), one `.alpha` per layer (kohya's
    way, all equal), or none: alpha = rank, as diffusers loads such a file."""
    if "lora_adapter_metadata" in header:
        try:
            meta = {k.removeprefix("transformer."): v for k, v in json.loads(header["lora_adapter_metadata"]).items()}
        except ValueError:
            raise LoraFileError(f"{path}: its header's lora_adapter_metadata is not JSON") from None
        if meta.get("rank_pattern") or meta.get("alpha_pattern"):
            raise LoraFileError(f"{path}: its layers have their own ranks or alphas (rank_pattern / alpha_pattern); "
                                "raytune_sd3 trains one rank and one alpha")
        if "lora_alpha" in meta:
            return float(meta["lora_alpha"])
    values = set(alphas.values())
    if len(values) > 1:
        raise LoraFileError(f"{path}: its layers have different alphas {sorted(values)[:4]}; raytune_sd3 trains one")
    return values.pop() if values else float(rank)


def load_lora_file(transformer: nn.Module, lora: LoraFile) -> None:
    """Copy the file's tensors into the adapter add_lora made (same kind, rank and layers: the driver checked);
    RuntimeError naming the keys where they do not fit."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, lora.tensors)
    expected = {k for k in transformer.state_dict() if ".lora_" in k}
    if getattr(result, "unexpected_keys", None) or len(lora.tensors) != len(expected):
        raise RuntimeError(f"lora.init_from {lora.path}: its {len(lora.tensors)} tensors do not fit this model's "
                           f"{len(expected)} adapter tensors (unexpected: {list(result.unexpected_keys)[:3]})")


def init_from_problems(cfg: JobConfig) -> list[str]:
    """On the driver, before Ray: why lora.init_from cannot start this job (`key: what, and the fix` each), or []
    after taking the file's kind, rank, alpha and targets into `cfg.lora` (where the job named them, they must
    agree: a job that names other ones is refused, naming both). Where the model's config is known here, the
    file's layers are checked against it (a LoRA of another model)."""
    from raytune_sd3.models.layers import known_transformer_config, meta_transformer
    from raytune_sd3.models.lora import target_modules

    lora_cfg = cfg.lora
    where = lora_cfg.init_from
    if where is None:
        return []
    if not where.exists():
        return [f"lora.init_from: {where} is not a file or folder (give a LoRA .safetensors, or a run's output_dir)"]
    try:
        found = read_lora_file(where)
    except LoraFileError as e:
        return [f"lora.init_from: {e}"]
    named = lora_cfg.model_fields_set
    problems = [f"lora.{key}: the job says {ours}, and lora.init_from {found.path} has {theirs}; remove lora.{key} "
                f"(the file's is used) or set it to {theirs}"
                for key, ours, theirs in (("kind", lora_cfg.kind, found.kind), ("rank", lora_cfg.rank, found.rank))
                if key in named and ours != theirs]
    alpha = lora_cfg.alpha if lora_cfg.alpha is not None else lora_cfg.rank
    if "alpha" in named and float(alpha) != found.alpha:
        problems.append(f"lora.alpha: the job says {alpha:g}, and lora.init_from {found.path} has {found.alpha:g} "
                        f"(raytune_sd3's files fold alpha into lora_B, so theirs is the rank); remove lora.alpha "
                        f"(the file's is used) or set it to {found.alpha:g}")
    config = known_transformer_config(cfg.model.pretrained, cfg.model.revision)
    transformer = meta_transformer(config) if isinstance(config, dict) else None
    if transformer is not None:
        linears = {n for n, m in transformer.named_modules() if isinstance(m, nn.Linear)}
        foreign = [m for m in found.modules if m not in linears]
        if foreign:
            return problems + [f"lora.init_from: {found.path} adapts layers that {cfg.model.pretrained} lacks (e.g. "
                               f"{foreign[:3]}): a LoRA of another model? Start from one trained on this model"]
        if {"targets", "blocks"} & named:
            try:
                ours = set(target_modules(transformer, lora_cfg))
            except ValueError:
                ours = set()  # layer_problems says why
            if ours != set(found.modules):
                missing, extra = sorted(set(found.modules) - ours), sorted(ours - set(found.modules))
                problems.append(
                    f"lora.targets: the job's targets {lora_cfg.targets!r} (blocks {lora_cfg.blocks}) select "
                    f"{len(ours)} layers, and lora.init_from {found.path} adapts {len(found.modules)}"
                    + (f" (it has {missing[:2]}, the job not)" if missing else "")
                    + (f" (the job has {extra[:2]}, it not)" if extra else "")
                    + "; remove lora.targets and lora.blocks (the file's layers are used)")
    if (problem := adapter_problem(found.kind, cfg.train.strategy)) is not None:
        problems.append(f"lora.init_from: {found.path} is a {found.kind}, and {problem}")
    if not problems:
        lora_cfg.kind, lora_cfg.rank, lora_cfg.alpha = found.kind, found.rank, found.alpha
        lora_cfg.targets, lora_cfg.blocks = list(found.modules), None
    return problems
