"""The memory estimate under bf16 autocast (the GPU default) against a traced step, and against the first GPU peaks.

    python benchmarks/estimate.py                  # SD3.5 Large, SD3.5 Medium, SD3 Medium; under a minute here
    python benchmarks/estimate.py --device cuda    # on a GPU: real CUDA autocast, and torch's max allocated

Each row traces one real training step on the CPU (benchmarks/tracer.py `trace_peak`, mixed_precision bf16: the
loop's LoraAutocast, with CPU autocast given CUDA's policy) of the model's first 2 blocks at its real width (512 px,
batch 1, T5 154, LoRA rank 16), and sets `raytune_sd3.memory` beside it: the activations the step keeps for
backward (with an fp32 base, plus the bf16 weight copies autocast keeps) and the whole step's peak (estimate
without the GPU runtime margin and the VAE). "formula without autocast" is what the estimate counted before it
knew autocast: an fp32 copy of every LoRA input, bf16 LayerNorm inputs, no weight copies. With `--device cuda` the
steps run on the GPU under CUDA's own autocast, and torch.cuda.max_memory_allocated is set beside the traced peak.

A second table traces the same step on a quanto base of each kind (bf16 weights, with and without autocast):
what it keeps for backward beside the unquantised base's, and its peak against the estimate.

Then the three peaks torch.cuda.max_memory_allocated reported on an H200 on 2026-11-28 (../shared/gpu/README.md:
benchmarks/gpu.py's step, bf16 base under bf16 autocast, peft's casts on, 1024 px) beside today's estimate of the
same step. Under CUDA's policy peft's casts cost no memory: the LoRA inputs of q/k/v are fp32 LayerNorm outputs
either way, and autocast keeps its bf16 copy for the matmul (the traced Large rows differ by 0.9%).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS, command, machine, machine_line, table, write_section

MODELS = {"SD3.5 Large": "stabilityai/stable-diffusion-3.5-large",
          "SD3.5 Medium": "stabilityai/stable-diffusion-3.5-medium",
          "SD3 Medium": "stabilityai/stable-diffusion-3-medium-diffusers"}
# torch.cuda.max_memory_allocated of benchmarks/gpu.py's step on an NVIDIA H200, 2026-11-28 (GiB)
H200_PEAKS = [("SD3.5 Large", 2, 48.7), ("SD3.5 Large", 4, 81.7), ("SD3.5 Medium", 2, 22.4)]
MIB = 1 << 20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="where the traced steps run (default cpu, with CUDA's autocast policy)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)} (default all)")
    p.add_argument("--kinds", default="int8,int4,int2,fp8", help="model.quantize kinds of the quanto table (default all)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def traced_row(model: str, targets: str, dtype: str, device: str) -> list:
    from tracer import trace_peak, two_blocks

    from raytune_sd3.memory import activation_bytes, autocast_weight_copies, estimate
    from raytune_sd3.models.catalogue import TransformerShape

    config = two_blocks(MODELS[model])
    shape = TransformerShape.from_config(config)
    kw = dict(dtype=dtype, targets=targets, rank=16, batch=1, resolution=512, t5_tokens=154)
    traced = trace_peak(config, device=device, mixed_precision="bf16", **kw)
    kept = traced["forward"] - traced["static"]
    formula = activation_bytes(shape, targets, 2, 1, 512, 154, autocast=True)
    if dtype == "fp32":
        formula += autocast_weight_copies(shape)
    before = activation_bytes(shape, targets, 2, 1, 512, 154)
    est = estimate(shape, vae_params=None, runtime=False, mixed_precision="bf16", **kw).total
    row = [model, targets, dtype, f"{kept / MIB:.1f}", f"{formula / MIB:.1f}", f"{formula / kept - 1:+.1%}",
           f"{before / kept - 1:+.1%}", f"{traced['peak'] / MIB:.1f}", f"{est / MIB:.1f}",
           f"{est / traced['peak'] - 1:+.1%}"]
    if "cuda_max_allocated" in traced:
        row.append(f"{traced['cuda_max_allocated'] / MIB:.1f}")
    return row


def quantised_row(model: str, quantization: str, mixed_precision: str, device: str) -> list:
    from tracer import trace_peak, two_blocks

    from raytune_sd3.memory import estimate
    from raytune_sd3.models.catalogue import TransformerShape

    config = two_blocks(MODELS[model])
    kw = dict(dtype="bf16", targets="attention", rank=16, batch=1, resolution=512, t5_tokens=154,
              mixed_precision=mixed_precision)
    plain = trace_peak(config, device=device, **kw)
    try:
        quantised = trace_peak(config, device=device, quantization=quantization, **kw)
    except Exception as e:  # noqa: BLE001 - a kind that fails on this device is a finding: reported in its row
        return [model, quantization, mixed_precision, f"{(plain['forward'] - plain['static']) / MIB:.1f}",
                f"failed: {type(e).__name__}: {str(e)[:120]}", "", "", ""]
    est = estimate(TransformerShape.from_config(config), vae_params=None, runtime=False, quantization=quantization,
                   **kw).total
    return [model, quantization, mixed_precision, f"{(plain['forward'] - plain['static']) / MIB:.1f}",
            f"{(quantised['forward'] - quantised['static']) / MIB:.1f}", f"{quantised['peak'] / MIB:.1f}",
            f"{est / MIB:.1f}", f"{est / quantised['peak'] - 1:+.1%}"]


def gpu_row(model: str, batch: int, measured_gib: float) -> list:
    from raytune_sd3.memory import GIB, estimate
    from raytune_sd3.models.catalogue import KNOWN_TRANSFORMERS, TransformerShape

    est = estimate(TransformerShape.from_config(KNOWN_TRANSFORMERS[MODELS[model]]), dtype="bf16",
                   targets="attention", rank=16, batch=batch, resolution=1024, t5_tokens=154,
                   mixed_precision="bf16", vae_params=None, runtime=False).total / GIB
    return [model, batch, f"{measured_gib:.1f}", f"{est:.1f}", f"{est / measured_gib - 1:+.1%}"]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine()
    t0 = time.perf_counter()
    models = [m.strip() for m in args.models.split(",")]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise SystemExit(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(MODELS)}")
    rows = [traced_row(model, targets, dtype, args.device) for model in models for targets in ("attention", "all")
            for dtype in ("bf16", "fp32")]
    header = ["model (2 blocks)", "LoRA targets", "base", f"kept for backward, traced on {args.device} (MiB)",
              "formula (MiB)", "error", "formula without autocast: error", "peak, traced (MiB)", "estimate (MiB)",
              "error"]
    traced = table(header + (["torch.cuda.max_memory_allocated (MiB)"] if args.device == "cuda" else []), rows)
    quantised = table(["model (2 blocks)", "model.quantize", "mixed precision", "kept, unquantised (MiB)",
                       "kept, quantised (MiB)", "peak, traced (MiB)", "estimate (MiB)", "error"],
                      [quantised_row(models[0], q, mp, args.device) for q in args.kinds.split(",")
                       for mp in ("bf16", "no")])
    gpu = table(["model", "batch", "H200 max allocated (GiB)", "estimate (GiB)", "error"],
                [gpu_row(*r) for r in H200_PEAKS])
    body = (f"Measured {machine_line(info)}. Command: {command('estimate.py', argv)} "
            f"({time.perf_counter() - t0:.0f} s). See the script's docstring for what each column is.\n\n"
            f"{traced}\n\nA quanto base (bf16 weights, LoRA rank 16 `attention`): models/quantize.py's linears keep "
            f"no input for backward, so a step keeps what it keeps unquantised (quanto's own linears kept about a "
            f"third more); its peak against the estimate.\n\n{quantised}\n\nThe first GPU peaks (1024 px, LoRA rank 16 `attention`, AdamW, bf16 base under bf16 "
            f"autocast, no checkpointing) beside today's estimate of the same step (no VAE, no runtime margin); "
            f"the estimate of 11-28 said 51.0, 86.4 and 24.8 GiB (+4.7%, +5.8%, +10.7%).\n\n{gpu}\n")
    print(body)
    if not args.no_write:
        write_section("memory estimate under bf16 autocast (the GPU default)", body, args.results)


if __name__ == "__main__":
    main()
