"""SD3.5 Large (8.1B) and Medium (2.5B) transformers, random weights, with our LoRA: training images/s per GPU,
peak memory and MFU, at 1024px and 512px with 154 T5 tokens, bf16.

    python benchmarks/gpu.py                      # on a GPU: Large and Medium, 1024px and 512px
    python benchmarks/gpu.py --models large --resolutions 1024 --batch 2
    python benchmarks/gpu.py --cpu-smoke          # anywhere: 2 layers, 4 heads, fp32, 256px (checks the script)
    python benchmarks/gpu.py --models medium --resolutions 1024 --batch 2 --product   # + the product's own loop
    python benchmarks/gpu.py --models large --resolutions 512 --batch 1 --quantize nf4 --optimizer lion8bit_paged \
        --gradient-checkpointing                  # jobs/sd35-lowvram.yaml's step: its own RESULTS.md section

--product also runs the product's own loop (the CLI's TorchTrainer, one worker; product.py) on a shaped pipeline of
the same architecture, with the same batch, resolution, text length, LoRA, dtype, autocast and AdamW, for the same
number of timed steps, after the bare step: it prints product/bare (target >= 0.97) and the MFU of each.

A step is what the job's loop does (train/loop.py) with the project's pieces: add_lora (rank 16, `attention`
targets as jobs/sd35.yaml; LoRA weights fp32), make_flow_batch and flow_loss, bf16 autocast, backward, global-norm
clipping, torch AdamW; timed with a device sync per step, median over --steps after --warmup.

FLOPs per step. F_fwd is what torch's FlopCounterMode counts over one forward pass of the LoRA'd model on the step's
batch (matmuls, convolutions, attention; elementwise ops are not counted). It splits into F_l for each layer with a
weight (nn.Linear, nn.Conv2d: the frozen base layers and LoRA's A and B) and F_attn = F_fwd - sum F_l (the attention
matmuls QK^T and PV). The backward pass of a layer of forward cost F costs F for the gradient of its input, needed
only if that input requires a gradient, plus F for the gradient of its weight, needed only if the weight is trained;
attention's backward costs 2 F_attn (gradients of Q, K and V). So

    F_train = sum_l F_l * (1 + [input of l needs a gradient] + [weight of l is trained]) + 3 F_attn

i.e. 2F for a frozen base layer that a LoRA sits before (its input gradient, no weight gradient), F for a frozen
layer that only sees data (patch embedding, text/time embedders, the adaLN projections of the time embedding),
3F for LoRA's A (on a layer inside the model) and B, 3F for attention. Flash attention recomputes QK^T in its
backward; that work is not counted (MFU counts the model's FLOPs, not an implementation's; gradient checkpointing's
recomputation is not counted either). The script also counts a whole step (forward + backward) with
FlopCounterMode as a check of the formula.

MFU = F_train / step time / the card's dense bf16 peak (raytune_sd3/hardware.py, matched on torch.cuda.get_device_name(); or
--peak-tflops). Baseline in the same process: a dense matmul's FLOP/s (bf16 8192^3 on a GPU, fp32 1024^3 on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from common import RESULTS, command, machine, machine_line, median, table, time_calls, write_section
from product import product_step
from profiler import profile_calls
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from raytune_sd3.train.flops import FlopCount, count_flops, countable_attention, peak_tflops  # noqa: F401

# diffusers SD3Transformer2DModel configs of stabilityai/stable-diffusion-3.5-{large,medium} (transformer/config.json)
SD35 = {
    "large": dict(num_layers=38, num_attention_heads=38, attention_head_dim=64, joint_attention_dim=4096,
                  caption_projection_dim=2432, pooled_projection_dim=2048, qk_norm="rms_norm", pos_embed_max_size=192,
                  patch_size=2, in_channels=16, out_channels=16, sample_size=128),
    "medium": dict(num_layers=24, num_attention_heads=24, attention_head_dim=64, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, qk_norm="rms_norm", pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), patch_size=2, in_channels=16, out_channels=16,
                   sample_size=128),
}
CLIP_TOKENS = 77
LEVERS = ["skip-lora-casts", "cudnn", "flash", "efficient", "math", "compile", "compile-graphs", "fp8"]
DEFAULT_BATCH = {1024: 2, 512: 8}  # halved on out-of-memory until it fits (or batch 1 does not)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(SD35), default=["large", "medium"])
    p.add_argument("--resolutions", type=int, nargs="+", help="square, in pixels (default 1024 512)")
    p.add_argument("--batch", type=int, help="images per step (default: 2 at 1024px, 8 at 512px, halved on OOM)")
    p.add_argument("--t5-tokens", type=int, default=154, help="T5 tokens after the 77 CLIP ones (default 154)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="attention", help="LoRA target preset (default attention, as jobs/sd35.yaml)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--quantize", choices=["none", "int8", "int4", "nf4"], default="none",
                   help="quantise the frozen base as model.quantize does (default none)")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw8bit", "lion8bit", "adamw8bit_paged",
                                                            "lion8bit_paged"],
                   help="train.optimizer (default adamw: torch's, fused on CUDA)")
    p.add_argument("--compile", action="store_true", help="torch.compile each block (train.compile; the first "
                   "warmup step's extra time is reported as the compile time)")
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math"],
                   help="the attention kernel (train.attention; default auto: torch's choice)")
    p.add_argument("--skip-lora-casts", action="store_true",
                   help="run the forward in the loop's LoraAutocast (peft's LoRA input casts off, as the product does "
                   "under bf16); default: peft's casts, as diffusers' training script")
    p.add_argument("--levers", nargs="+", default=[], choices=LEVERS,
                   help="after each model's first row, time it again with each lever on, on the same model (the "
                   "in-place ones, compile, compile-graphs and fp8, last and on top of each other) and print on/off")
    p.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, if raytune_sd3/hardware.py does not know the card")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="on the CPU at reduced size: 2 layers, 4 heads, fp32, 256px, batch 1, 3 steps")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--heads", type=int, help="override the number of heads (width = heads x 64)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after the timed steps, N more under torch.profiler (profiler.py), for the bare step and, with "
                   "--product, the product's loop: device busy, kernel launches, syncs and reads per step, top kernels")
    p.add_argument("--product", action="store_true",
                   help="also run the product's own loop on a shaped pipeline of each model (product.py)")
    p.add_argument("--workdir", type=Path, default=Path("outputs/bench-gpu"),
                   help="--product's pipelines, caches and runs (default outputs/bench-gpu; pipelines are reused)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.layers, args.heads = args.layers or 2, args.heads or 4
        args.resolutions, args.batch = args.resolutions or [256], args.batch or 1
        args.steps, args.warmup = min(args.steps, 3), min(args.warmup, 1)
    args.resolutions = args.resolutions or [1024, 512]
    return args


def model_config(name: str, layers: int | None = None, heads: int | None = None) -> dict:
    """The diffusers config of SD3.5 `name`, optionally with fewer layers or heads (the width follows the heads)."""
    spec = dict(SD35[name])
    if layers:
        spec["num_layers"] = layers
        if "dual_attention_layers" in spec:
            spec["dual_attention_layers"] = tuple(i for i in spec["dual_attention_layers"] if i < layers)
    if heads:
        spec.update(num_attention_heads=heads, caption_projection_dim=heads * spec["attention_head_dim"])
    return spec


def build_transformer(spec: dict, device: torch.device, dtype: torch.dtype, rank: int, targets: str,
                      quantize: str = "none"):
    """SD3Transformer2DModel(**spec) with random weights, made on `device` in `dtype`, frozen, quantised as
    model.quantize `quantize` does, with our LoRA. Returns (model, LoRA parameters)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.utils import logging

    from raytune_sd3.config import LoraConfig
    from raytune_sd3.models.lora import add_lora
    from raytune_sd3.models.quantize import quantize_transformer

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in dtype on the device: Large in fp32 would need 32 GB more
    try:
        with torch.device(device):
            model = SD3Transformer2DModel(**spec)
        logging.set_verbosity_error()  # else a warning that .to(dtype) is not from_pretrained(torch_dtype=...)
        model.to(dtype)  # the fp32 buffers (positional embedding)
    finally:
        torch.set_default_dtype(default)
    model = quantize_transformer(model.requires_grad_(False), quantize, device=device)
    params = add_lora(model, LoraConfig(rank=rank, targets=targets))
    return model, params


def make_batch(spec: dict, resolution: int, batch: int, t5_tokens: int, device: torch.device,
               dtype: torch.dtype) -> dict:
    """Random cached-batch tensors: latents (B, 16, res/8, res/8), prompt embeds (B, 77 + t5, 4096), pooled."""
    g = torch.Generator().manual_seed(0)
    lat = resolution // 8
    return {"latents": torch.randn(batch, spec["in_channels"], lat, lat, generator=g).to(device, dtype),
            "prompt_embeds": torch.randn(batch, CLIP_TOKENS + t5_tokens, spec["joint_attention_dim"],
                                         generator=g).to(device, dtype),
            "pooled": torch.randn(batch, spec["pooled_projection_dim"], generator=g).to(device, dtype)}


@dataclass
class Trainer:
    """One training step of the job's loop on a prepared model and batch."""

    model: nn.Module
    params: list
    batch: dict
    autocast: bool
    optimizer_name: str = "adamw"
    attention: str = "auto"
    skip_casts: bool = False

    def __post_init__(self):
        from raytune_sd3.config import FlowConfig, TrainConfig
        from raytune_sd3.train.optim import make_optimizer

        self.flow = FlowConfig(shift=1.0)
        if self.optimizer_name == "adamw":
            self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, fused=self.params[0].is_cuda or None)
        else:  # bitsandbytes' (CUDA), as the job builds it
            self.optimizer = make_optimizer(self.params, TrainConfig(optimizer=self.optimizer_name,
                                                                     learning_rate=1e-4))
        self.device = self.batch["latents"].device
        self.model.train()

    def _autocast(self):
        if not self.autocast:
            return contextlib.nullcontext()
        if self.skip_casts:
            from raytune_sd3.models.lora import LoraAutocast

            return LoraAutocast(self.model, self.device.type)
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def forward_loss(self) -> torch.Tensor:
        from raytune_sd3.flow import flow_loss, make_flow_batch

        latents = self.batch["latents"]
        fb = make_flow_batch(self.flow, latents, torch.Generator().manual_seed(0))
        with self._autocast():
            pred = self.model(hidden_states=fb.noisy, timestep=fb.timesteps,
                              encoder_hidden_states=self.batch["prompt_embeds"],
                              pooled_projections=self.batch["pooled"], return_dict=False)[0]
            return flow_loss(self.flow, pred, latents, fb.noise, fb.sigmas).mean()

    def step(self) -> None:
        from raytune_sd3.train.attention import attention_kernel

        with attention_kernel(self.attention)():
            self.forward_loss().backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# --- FLOPs ---------------------------------------------------------------------------------------------------------


def count_step_flops(trainer: Trainer) -> int:
    """FlopCounterMode over a whole forward + backward (the check of FlopCount.training)."""
    with countable_attention(trainer.device), FlopCounterMode(display=False) as counter:
        trainer.forward_loss().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def matmul_flops_per_s(device: torch.device, dtype: torch.dtype) -> float:
    """The baseline: FLOP/s of a dense square matmul (8192 on a GPU, 1024 on a CPU), median of 10."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)

    def mm():
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()

    return 2 * n**3 / median(time_calls(mm, 10, warmup=3))


# --- the benchmark -------------------------------------------------------------------------------------------------


def peak_memory_gib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "torch.cuda.max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process peak RSS"  # ru_maxrss is KiB


def estimated_gib(spec: dict, resolution: int, batch: int, args, dtype) -> float:
    """What `python -m raytune_sd3.check` estimates for this step (one worker, no VAE, no runtime margin: the
    tensors torch.cuda.max_memory_allocated counts), to set beside the measured peak. Under bf16 it models the
    product's step (LoraAutocast: no fp32 LoRA-input copies): the skip-lora-casts lever's row and the product's."""
    from raytune_sd3.memory import estimate
    from raytune_sd3.models.catalogue import TransformerShape

    return estimate(TransformerShape.from_config(spec), dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                    targets=args.targets, rank=args.rank, batch=batch, resolution=resolution, t5_tokens=args.t5_tokens,
                    mixed_precision="bf16" if dtype == torch.bfloat16 else "no", quantization=args.quantize,
                    vae_params=None, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
                    runtime=False).total / 2**30


def measure(model, params, spec: dict, resolution: int, batch: int, args, device, dtype,
            counted: dict | None = None) -> dict:
    """Time the step; `counted`: a row of the same model and batch whose FLOP counts to reuse (a lever changes
    how the step runs, not its model FLOPs; counting a forward and a step of SD3.5 Large costs seconds)."""
    trainer = Trainer(model, params, make_batch(spec, resolution, batch, args.t5_tokens, device, dtype),
                      autocast=dtype == torch.bfloat16, optimizer_name=args.optimizer,
                      attention=args.attention, skip_casts=args.skip_lora_casts)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = time_calls(trainer.step, 1, warmup=0)[0]  # with --compile: compiles this shape
    times = time_calls(trainer.step, args.steps, warmup=max(args.warmup - 1, 0))
    memory, memory_kind = peak_memory_gib(device)
    profile = profile_calls(trainer.step, args.profile, device) if args.profile else None
    if counted is None:
        flops = count_flops(model, trainer.forward_loss, device)
        counted = {"forward_flops": flops.forward, "train_flops": flops.training(),
                   "counted_step_flops": count_step_flops(trainer), "breakdown": flops.breakdown()}
    counted = {k: counted[k] for k in ("forward_flops", "train_flops", "counted_step_flops", "breakdown")}
    step_s = median(times)
    return {"resolution": resolution, "batch": batch, "step_s": step_s, "images_per_s": batch / step_s,
            "peak_memory_gib": memory, "memory_kind": memory_kind,
            "estimate_gib": estimated_gib(spec, resolution, batch, args, dtype), "profile": profile, **counted,
            "tflops_per_s": counted["train_flops"] / step_s / 1e12, "first_step_extra_s": first - step_s}


IN_PLACE = ["compile", "compile-graphs", "fp8"]  # levers that change the model for good: run last, in this order


def apply_lever(model, lever: str) -> dict:
    """Turn `lever` on: in place on `model` (IN_PLACE), else the measure() arguments that turn it on."""
    from raytune_sd3.models.loading import compile_blocks

    if lever == "skip-lora-casts":
        return {"skip_lora_casts": True}
    if lever in ("compile", "compile-graphs"):  # compile-graphs recompiles with CUDA graphs (reduce-overhead)
        compile_blocks(model, mode="reduce-overhead" if lever == "compile-graphs" else None)
        return {}
    if lever == "fp8":  # the frozen base's linears in float8 (torchao), regionally compiled as torchao needs
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=lambda m, name: (
            "lora_" not in name and isinstance(m, nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0))
        compile_blocks(model)
        return {}
    return {"attention": lever}


def measure_levers(model, params, spec: dict, row: dict, args, device, dtype) -> list[dict]:
    """`row`'s step again with each of --levers on alone, on the same model (IN_PLACE ones last, in that order:
    each on top of the ones before it). A lever that fails is reported and the others still run."""
    out = []
    order = sorted(args.levers, key=lambda name: IN_PLACE.index(name) + 1 if name in IN_PLACE else 0)
    for lever in order:
        try:
            changed = apply_lever(model, lever) | {"profile": 0}
            r = measure(model, params, spec, row["resolution"], row["batch"],
                        argparse.Namespace(**{**vars(args), **changed}), device, dtype, counted=row)
        except Exception as e:  # noqa: BLE001 - a lease must not lose the other figures to one lever
            out.append({"lever": lever, "error": f"{type(e).__name__}: {e}"[:300]})
            print(f"{row['model']} {row['resolution']}px batch {row['batch']}, {lever}: failed: {out[-1]['error']}",
                  flush=True)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        out.append({"lever": lever, "images_per_s": r["images_per_s"], "ratio": r["images_per_s"] / row["images_per_s"],
                    "peak_memory_gib": r["peak_memory_gib"], "first_step_extra_s": r["first_step_extra_s"],
                    "tflops_per_s": r["tflops_per_s"]})
        print(f"{row['model']} {row['resolution']}px batch {row['batch']}, {lever}: {r['images_per_s']:.3g} images/s "
              f"({out[-1]['ratio']:.3f} x without), peak memory {r['peak_memory_gib']:.2f} GiB", flush=True)
    return out


def run_model(name: str, args, device, dtype) -> list[dict]:
    spec = model_config(name, args.layers, args.heads)
    model, params = build_transformer(spec, device, dtype, args.rank, args.targets, args.quantize)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.compile:
        from raytune_sd3.models.loading import compile_blocks

        compile_blocks(model)
    info = {"model": name, "layers": spec["num_layers"], "heads": spec["num_attention_heads"],
            "params_b": sum(p.numel() for p in model.parameters()) / 1e9, "lora_params": sum(p.numel() for p in params)}
    out = []
    for res in args.resolutions:
        batch = args.batch or DEFAULT_BATCH.get(res, 1)
        while True:
            try:
                out.append({**info, **measure(model, params, spec, res, batch, args, device, dtype)})
                break
            except torch.OutOfMemoryError:
                gc.collect()
                torch.cuda.empty_cache()
                if batch == 1:
                    out.append({**info, "resolution": res, "batch": 1, "oom": True})
                    break
                batch //= 2
        r = out[-1]
        print(f"{name} {res}px batch {r['batch']}: " + ("out of memory" if r.get("oom") else
              f"{r['images_per_s']:.3g} images/s, peak memory {r['peak_memory_gib']:.2f} GiB ({r['memory_kind']}), "
              f"forward {r['forward_flops']:.4g} FLOPs, training {r['train_flops']:.4g} FLOPs/step "
              f"(counted fwd+bwd {r['counted_step_flops']:.4g}), {r['tflops_per_s']:.3g} TFLOP/s"), flush=True)
    if args.levers and not out[0].get("oom"):
        out[0]["levers"] = measure_levers(model, params, spec, out[0], args, device, dtype)
    del model, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no GPU visible: run on a GPU machine, or with --cpu-smoke to check the script on a CPU")
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda")
    if args.cpu_smoke and args.product:
        torch.set_num_threads(1)  # as the product's Ray Train worker (OMP_NUM_THREADS=1): like against like
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    base = matmul_flops_per_s(device, dtype)
    peak = peak_tflops(device, args.peak_tflops)
    print(f"baseline: dense {dtype} matmul {base / 1e12:.3g} TFLOP/s; card peak "
          f"{f'{peak:g} TFLOP/s' if peak else 'unknown (--peak-tflops)'}", flush=True)
    rows = [r for name in args.models for r in run_model(name, args, device, dtype)]
    for r in rows:
        if not r.get("oom"):
            r["mfu"] = r["tflops_per_s"] / peak if peak else None
            for lever in r.get("levers", []):
                lever["mfu"] = lever["tflops_per_s"] / peak if peak and "error" not in lever else None
            r["x_matmul"] = r["tflops_per_s"] * 1e12 / base
    if args.product:  # after the bare models are freed: the product's worker gets the whole card
        for r in rows:
            if not r.get("oom"):
                spec = model_config(r["model"], args.layers, args.heads)
                r.update(product_step(spec, r["model"], r["resolution"], r["batch"], args, args.workdir))
                r["product_ratio"] = r["step_s"] / r["product_step_s"]
                r["product_period_ratio"] = r["step_s"] / r["product_period_s"]
                print(f"{r['model']} {r['resolution']}px batch {r['batch']}: product {r['product_images_per_s']:.3g} "
                      f"images/s in-step ({r['product_ratio']:.3f} x the bare step), step to step "
                      f"{r['product_period_ratio']:.3f} x", flush=True)
    info = machine()
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "matmul_flops_per_s": base, "peak_tflops": peak,
                                         "rows": rows}, indent=1))
    body = report(rows, args, argv, info, device, dtype, base, peak)
    print(body)
    if not args.no_write:
        if args.cpu_smoke:
            write_section("gpu: smoke run on the CPU (reduced size)", body, args.results)
            text = args.results.read_text()
            if "## gpu: SD3.5 Large and Medium" not in text:
                write_section("gpu: SD3.5 Large and Medium", "Pending a GPU machine: run `python benchmarks/gpu.py` "
                              "there (about 3 minutes on one H100).", args.results)
        elif args.quantize != "none" or args.optimizer != "adamw":  # a low-VRAM setup: a section of its own
            write_section(f"gpu: low VRAM ({args.quantize} base, {args.optimizer})", body, args.results)
        else:
            write_section("gpu: SD3.5 Large and Medium", body, args.results)
    return rows


def report(rows, args, argv, info, device, dtype, base, peak) -> str:
    lines = []
    for r in rows:
        if r.get("oom"):
            lines.append([r["model"], f"{r['params_b']:.2f}", f"{r['resolution']}px", 1, "OOM", *[""] * 6])
            continue
        lines.append([r["model"], f"{r['params_b']:.2f}", f"{r['resolution']}px", r["batch"],
                      f"{r['images_per_s']:.3g}", f"{r['peak_memory_gib']:.2f}", f"{r['estimate_gib']:.2f}",
                      f"{r['forward_flops']:.4g}",
                      f"{r['train_flops']:.4g} ({r['counted_step_flops'] / r['train_flops']:.3f})",
                      f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a", f"{r['x_matmul']:.2f}"])
    size = ("" if not (args.layers or args.heads) else
            f", reduced to {rows[0]['layers']} layers x {rows[0]['heads']} heads x 64")
    kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process peak RSS"
    return "\n\n".join([
        command("gpu.py", argv), f"{machine_line(info)}.",
        f"Setup: SD3.5 transformer architectures with random weights{size}, {str(dtype).removeprefix('torch.')}"
        f"{' autocast' if dtype == torch.bfloat16 else ''}, LoRA rank {args.rank} ({args.targets}), "
        f"{CLIP_TOKENS}+{args.t5_tokens} text tokens, {'AdamW' if args.optimizer == 'adamw' else args.optimizer}"
        f"{f', {args.quantize} base' if args.quantize != 'none' else ''}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
        f"{', compiled blocks (first step +' + format(rows[0].get('first_step_extra_s', 0), '.1f') + ' s)' if args.compile else ''}"
        f"{', attention ' + args.attention if args.attention != 'auto' else ''}"
        f"{', peft LoRA input casts skipped' if args.skip_lora_casts else ''}; median of {args.steps} steps. "
        f"Peak memory: {kind}; beside it what raytune_sd3.check estimates for the step (one worker, no VAE, "
        f"no runtime margin). Training FLOPs by the formula in gpu.py (in brackets: FlopCounterMode's count of a "
        f"whole forward+backward over it). Baseline: dense matmul {base / 1e12:.3g} TFLOP/s in the same process; "
        f"card peak {f'{peak:g} TFLOP/s' if peak else 'n/a'}.",
        table(["model", "params (B)", "res", "batch", "images/s", "peak mem (GiB)", "check's estimate (GiB)",
               "forward FLOPs",
               "training FLOPs/step (counted/formula)", "MFU", "x matmul"], lines),
        *lever_report(rows), *product_report(rows, args), *profile_report(rows)])


def profile_report(rows: list[dict]) -> list[str]:
    """--profile's figures, bare step and product loop side by side, and each one's top kernels; or nothing."""
    runs = [(r, who, r.get(key)) for r in rows for who, key in (("bare", "profile"), ("product", "product_profile"))
            if r.get(key)]
    if not runs:
        return []

    def opt(v, fmt):
        return format(v, fmt) if v is not None else "n/a"

    lines = [[r["model"], f"{r['resolution']}px", r["batch"], who, f"{p['wall_s'] * 1e3:.1f}",
              opt(p["kernel_s"] and p["kernel_s"] * 1e3, ".1f"), opt(p["device_busy"], ".1%"), f"{p['launches']:.0f}",
              f"{p['syncs']:.1f}", f"{p['reads']:.1f}"] for r, who, p in runs]
    kernels = [[r["model"], who, k["name"], f"{k['s'] * 1e3:.2f}", f"{k['share']:.1%}"]
               for r, who, p in runs for k in p["top_kernels"]]
    out = [f"Where the time goes: {runs[0][2]['steps']} more steps of each under torch.profiler (benchmarks/profiler.py; "
           "its own overhead slows the host a little). Device busy = GPU kernel time / wall: below 100% the GPU waits "
           "on the host. Syncs = cuda*Synchronize calls; reads = tensor values read into Python (.item() and kin).",
           table(["model", "res", "batch", "loop", "wall ms/step", "kernel ms/step", "device busy", "launches/step",
                  "syncs/step", "reads/step"], lines)]
    if kernels:
        out.append(table(["model", "loop", "kernel (top by time)", "ms/step", "share of kernel time"], kernels))
    out.append(table(["model", "loop", "host op (top by self time)", "ms/step", "calls/step"],
                     [[r["model"], who, o["name"], f"{o['s'] * 1e3:.2f}", f"{o['calls']:.0f}"]
                      for r, who, p in runs for o in p["top_host_ops"]]))
    return out


def lever_report(rows: list[dict]) -> list[str]:
    """Each --levers lever on alone against the row without it (the first row of each model), or nothing."""
    lines = [[r["model"], f"{r['resolution']}px", r["batch"], lv["lever"], f"{r['images_per_s']:.3g}",
              f"{lv['images_per_s']:.3g}", f"**{lv['ratio']:.3f}**",
              f"{r['mfu']:.1%} -> {lv['mfu']:.1%}" if lv.get("mfu") is not None else "n/a", f"{lv['peak_memory_gib']:.2f}",
              f"{lv['first_step_extra_s']:.1f}"] if "error" not in lv else
             [r["model"], f"{r['resolution']}px", r["batch"], lv["lever"], f"{r['images_per_s']:.3g}",
              f"failed: {lv['error'][:100]}", "", "", "", ""] for r in rows for lv in r.get("levers", [])]
    if not lines:
        return []
    return ["Levers, each on alone on the same model, steps and batch as the row above it (peft's LoRA input casts "
            "skipped = the product's LoraAutocast; cudnn/flash/efficient/math = train.attention; compile = "
            "train.compile, regional; compile-graphs = the same with mode reduce-overhead, CUDA graphs; fp8 = the frozen "
            "base's linears in float8 through torchao, compiled; compile, compile-graphs and fp8 change the model for "
            "good, so each is measured on top of the ones before it). First step extra: the first step's time "
            "beyond the median (compile time).",
            table(["model", "res", "batch", "lever", "images/s off", "images/s on", "on/off", "MFU", "peak mem on (GiB)",
                   "first step extra (s)"], lines)]


def product_report(rows: list[dict], args) -> list[str]:
    """The product's loop beside the bare step (--product), or nothing."""
    rows = [r for r in rows if "product_step_s" in r]
    if not rows:
        return []

    def pct(v):
        return f"{v:.1%}" if v is not None else "n/a"

    def same_casts(r) -> str:
        """product / the bare step with the product's LoraAutocast (the skip-lora-casts lever), when it ran."""
        lever = next((lv for lv in r.get("levers", []) if lv["lever"] == "skip-lora-casts" and "error" not in lv), None)
        return f"{r['product_images_per_s'] / lever['images_per_s']:.3f}" if lever else "n/a"

    lines = [[r["model"], f"{r['resolution']}px", r["batch"], f"{r['images_per_s']:.3g}",
              f"{r['product_images_per_s']:.3g}", f"**{r['product_ratio']:.3f}**", same_casts(r),
              f"{r['product_period_ratio']:.3f}", pct(r["mfu"]), pct(r["product_mfu"])] for r in rows]
    return [f"The product's loop (python -m raytune_sd3.train's TorchTrainer, one worker, benchmarks/product.py) on a "
            f"shaped pipeline of the same architecture, same settings, median of the same {args.steps} steps after "
            f"{args.warmup} (the checkpoint step left out). In-step: the loop's step_time_s; step to step adds "
            "metrics.jsonl and ray.train.report. Target: product/bare >= 0.97. The bare step keeps peft's LoRA input "
            "casts, as a diffusers script does; the product turns them off (LoraAutocast), so the column beside it "
            "compares with the bare step run that way too (its skip-lora-casts lever), in-step.",
            table(["model", "res", "batch", "bare images/s", "product images/s (in-step)",
                   "product/bare, in-step", "product/bare without casts, in-step", "product/bare, step to step",
                   "bare MFU", "product MFU"], lines),
            "The product's start with a warm cache (the demo images were cached just before, through Ray Data: "
            "'prepare' is that caching, plus Ray's start for the first model), fit() to the first step on rank 0 by "
            "phase (common.py's JobRun.startup; 'setup' holds the frozen base's copy to the device):",
            table(["model", "prepare (s)", *rows[0]["product_startup"], "fit() to first step (s)"],
                  [[r["model"], f"{r['product_prepare_s']:.1f}", *(f"{v:.1f}" for v in r["product_startup"].values()),
                    f"{sum(r['product_startup'].values()):.1f}"] for r in rows])]


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
