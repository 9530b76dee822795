"""Peak tensor memory of one training step per worker, for the tiny model under each training option, against the
fp32 AdamW baseline in the same run.

    python benchmarks/memory.py               # writes its section of RESULTS.md
    python benchmarks/memory.py --no-write    # print only

Each option is jobs/tiny.yaml with a few --set values. Training steps on the CPU, one worker, built from the
components train/loop.py uses, in its order: load_transformer -> quantize_transformer -> enable_gradient_checkpointing
-> add_lora -> make_optimizer; each step make_flow_batch, forward (under bf16 autocast when train.mixed_precision is
bf16), flow_loss, backward, clip_gradients, optimizer.step, zero_grad. The second step is measured (the first
creates the optimizer state after its backward; every later step holds it throughout), as tracer.py's
trace_peak measures: its tensor-storage tracker (`PeakTensorMemory`, a TorchDispatchMode) is handed the weights,
buffers, optimizer state and batch first, then the step runs inside it. Figures, in bytes:

  static           weights + buffers + LoRA
  optimizer state  the optimizer's state tensors (moments; torch AdamW's per-parameter step counters)
  peak             the most bytes live at once in the step: static + state + batch + activations + gradients

quanto's quantised weights are tensor subclasses whose untyped_storage() is a placeholder of full-precision size,
so the tracker here counts a subclass by its inner tensors (__tensor_flatten__); the quanto rows also give the
stock tracker's figures. Memory is deterministic: every option runs twice and the two measurements must be equal.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from pathlib import Path

from common import RESULTS, TINY_JOB, command, machine, machine_line, table, write_section

TITLE = "memory: peak tensor memory per training worker, by training option (tiny model)"
BASELINE = "baseline: fp32 base, AdamW"
OPTIONS: list[tuple[str, list[str]]] = [  # (row, --set values on jobs/tiny.yaml)
    (BASELINE, []),
    ("bf16 autocast", ["train.mixed_precision=bf16"]),
    ("bf16 base", ["model.dtype=bf16"]),
    ("bf16 LoRA + adamw_bf16", ["lora.dtype=bf16", "train.optimizer=adamw_bf16"]),
    ("int8 base (quanto)", ["model.quantize=int8"]),
    ("int4 base (quanto)", ["model.quantize=int4"]),
    ("gradient checkpointing", ["train.gradient_checkpointing=true"]),
    ("lion", ["train.optimizer=lion"]),
    ("stableadamw", ["train.optimizer=stableadamw"]),
]
QUANTO_ATTENTION: list[tuple[str, list[str]]] = [  # quanto's saved inputs show when LoRA leaves linears out
    ("fp32 base", ["lora.targets=attention"]),
    ("int8 base", ["lora.targets=attention", "model.quantize=int8"]),
]
NOT_MEASURED = [
    ("train.strategy zero2 / zero3", "DeepSpeed ZeRO shards the optimizer state and gradients (ZeRO-3 also the "
     "base weights) across >= 2 workers; one process holds the whole of each, so there is nothing to shard here"),
    ("train.optimizer adamw8bit / lion8bit", "bitsandbytes' 8-bit optimizers run on CUDA only; this machine has no "
     "GPU (make_optimizer refuses them without one)"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def subclass_aware_tracker():
    """tracer.py's PeakTensorMemory, counting a tensor subclass (quanto's QTensors, and their
    PackedTensor) by the storages of its inner tensors: the subclass's own untyped_storage() is a placeholder sized
    as if every element were of its outer dtype (fp32 for an int8 weight), which would show no saving at all."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass
    from tracer import PeakTensorMemory

    class PeakTensorMemoryOfInnerTensors(PeakTensorMemory):
        def track(self, t) -> None:
            if is_traceable_wrapper_subclass(t):
                for name in t.__tensor_flatten__()[0]:
                    self.track(getattr(t, name))
            else:
                super().track(t)

    return PeakTensorMemoryOfInnerTensors()


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages under `tensors` (subclasses by their inner tensors)."""
    tracker = subclass_aware_tracker()
    for t in tensors:
        tracker.track(t)
    return tracker.live


def make_batch(transformer, cfg, dtype) -> dict:
    """Random cached-batch tensors of the job's shapes: latents (B, in_channels, res/8, res/8), prompt_embeds
    (B, 77 CLIP + t5_max_length tokens, joint_attention_dim), pooled (B, pooled_projection_dim)."""
    import torch

    from raytune_sd3.memory import TEXT_CLIP_TOKENS

    c, b = transformer.config, cfg.train.batch_size
    side = cfg.data.datasets[0].resolution // 8  # the SD3 VAE downsamples by 8
    g = torch.Generator().manual_seed(cfg.train.seed)
    return {"latents": torch.randn(b, c.in_channels, side, side, generator=g).to(dtype),
            "prompt_embeds": torch.randn(b, TEXT_CLIP_TOKENS + cfg.text.t5_max_length, c.joint_attention_dim,
                                         generator=g).to(dtype),
            "pooled": torch.randn(b, c.pooled_projection_dim, generator=g).to(dtype)}


def measure(cfg, pretrained: str, stock: bool = False) -> dict[str, int]:
    """Tensor memory in bytes of a training step of `cfg` on the CPU, one worker, set up as train/loop.py does:
    static (weights + buffers + LoRA), buffers, lora, optimizer_state, and peak, of the second step: the first
    creates the optimizer state, which every later step holds throughout. With `stock`, also static_stock and
    peak_stock: the same step as tracer.py's own tracker counts it."""
    import torch
    from tracer import PeakTensorMemory

    from raytune_sd3.driver.placement import ensure_resolved
    from raytune_sd3.flow import flow_loss, make_flow_batch
    from raytune_sd3.models.loading import DTYPES, load_transformer
    from raytune_sd3.models.lora import add_lora
    from raytune_sd3.models.quantize import quantize_transformer
    from raytune_sd3.train.optim import make_optimizer
    from raytune_sd3.train.strategy import clip_gradients

    ensure_resolved(cfg)  # `auto` dtypes as on this machine's CPU
    t, dtype = cfg.train, DTYPES[cfg.model.dtype]
    transformer = quantize_transformer(load_transformer(pretrained, dtype, cfg.model.revision), cfg.model.quantize)
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    params = add_lora(transformer, cfg.lora, seed=t.seed)
    optimizer = make_optimizer(params, t)
    batch = make_batch(transformer, cfg, dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if t.mixed_precision == "bf16" else contextlib.nullcontext()

    def train_step(step: int) -> None:  # the loop's step with one micro-batch on one worker (no DDP wrapper)
        fb = make_flow_batch(cfg.flow, batch["latents"], torch.Generator().manual_seed(step))
        with autocast:
            pred = transformer(hidden_states=fb.noisy, timestep=fb.timesteps,
                               encoder_hidden_states=batch["prompt_embeds"], pooled_projections=batch["pooled"],
                               return_dict=False)[0]
            loss = flow_loss(cfg.flow, pred, batch["latents"], fb.noise, fb.sigmas).mean()
            loss.backward()
        clip_gradients(params, cfg)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    transformer.train()
    train_step(1)
    weights = [*transformer.parameters(), *transformer.buffers()]
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    trackers = [subclass_aware_tracker(), *([PeakTensorMemory()] if stock else [])]
    static = []
    for tracker in trackers:
        for x in weights:
            tracker.track(x)
        static.append(tracker.live)
        for x in [*state, *batch.values()]:
            tracker.track(x)
    with contextlib.ExitStack() as modes:  # stacked dispatch modes: each sees every op
        for tracker in trackers:
            modes.enter_context(tracker)
        train_step(2)
    out = {"static": static[0], "buffers": storage_bytes(transformer.buffers()), "lora": storage_bytes(params),
           "optimizer_state": storage_bytes(state), "peak": trackers[0].peak}
    if stock:
        out.update(static_stock=static[1], peak_stock=trackers[1].peak)
    return out


def measure_twice(cfg, pretrained: str, name: str, stock: bool = False) -> dict[str, int]:
    """`measure`, run twice on freshly loaded models; the two must agree (tensor memory is deterministic)."""
    first, second = measure(cfg, pretrained, stock), measure(cfg, pretrained, stock)
    if first != second:
        raise RuntimeError(f"{name}: two runs of the same step measured differently: {first} vs {second}")
    print(f"{name}: " + ", ".join(f"{k} {v:,}" for k, v in first.items()), flush=True)
    return first


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from raytune_sd3.config import load_job
    from raytune_sd3.testmodels.resolve import resolve_pretrained

    torch.set_num_threads(1)  # toy tensors: threads only add spinning, and several contend badly on a busy machine
    job = load_job(TINY_JOB)
    pretrained = resolve_pretrained(job.model.pretrained)
    res = {name: measure_twice(load_job(TINY_JOB, sets), pretrained, name,
                         stock=any(s.startswith("model.quantize=") for s in sets))
           for name, sets in OPTIONS}
    attention = {name: measure_twice(load_job(TINY_JOB, sets), pretrained, name) for name, sets in QUANTO_ATTENTION}
    base = res[BASELINE]

    def cells(r: dict, b: dict, key: str) -> list[str]:
        return [f"{r[key]:,}", f"{r[key] / b[key]:.2f}"]

    rows = [[name, " ".join(f"`{s}`" for s in sets) or "-", *cells(res[name], base, "static"),
             f"{res[name]['lora']:,}", *cells(res[name], base, "optimizer_state"), *cells(res[name], base, "peak")]
            for name, sets in OPTIONS]
    header = ["option", "--set", "static bytes", "x base", "LoRA bytes", "optimizer state bytes", "x base",
              "peak bytes", "x base"]
    att_base = attention[QUANTO_ATTENTION[0][0]]
    att_rows = [[name, " ".join(f"`{s}`" for s in sets), *cells(attention[name], att_base, "static"),
                 *cells(attention[name], att_base, "peak")] for name, sets in QUANTO_ATTENTION]
    att_header = ["LoRA on attention only", "--set", "static bytes", "x fp32", "peak bytes", "x fp32"]
    body = "\n\n".join([
        command("memory.py", argv), f"{machine_line(machine())}.",
        f"Setup: {setup_line(job, pretrained)}. Built from the loop's own components, in its order "
        "(load_transformer, quantize_transformer, enable_gradient_checkpointing, add_lora, make_optimizer; each "
        "step make_flow_batch, forward under bf16 autocast when train.mixed_precision is bf16, flow_loss, "
        "backward, clip_gradients, optimizer.step, zero_grad), and measured with tracer.py's "
        "tensor-storage tracker (`PeakTensorMemory`) as `trace_peak` uses it: weights, buffers, optimizer "
        "state and batch handed to it first, then the step run inside it. The step measured is the *second*: the "
        "first creates the optimizer state after its backward, so its peak leaves the state out, while every "
        "later step holds it throughout. *static* = weights + buffers + LoRA; *optimizer state* = moments (and "
        "torch AdamW's step counters); *peak* = the most bytes live at once in the step (static + optimizer state "
        "+ batch + activations + gradients). Each option ran twice on a freshly loaded model with identical "
        "figures (memory is deterministic: no medians).",
        table(header, rows),
        "Not measured here: " + "; ".join(f"**{n}**: {why}" for n, why in NOT_MEASURED) + ".",
        quanto_paragraph(res, base),
        table(att_header, att_rows),
        interpretation(res, base, job)])
    print(body)
    if not args.no_write:
        write_section(TITLE, body, args.results)
    return res


def transformer_config(pretrained: str) -> dict:
    return json.loads((Path(pretrained) / "transformer" / "config.json").read_text())


def setup_line(job, pretrained: str) -> str:
    c, t, res = transformer_config(pretrained), job.train, job.data.datasets[0].resolution
    return (f"{job.model.pretrained} ({c['num_layers']} blocks, width {c['num_attention_heads'] * c['attention_head_dim']}), "
            f"batch {t.batch_size}, {res}px (latents {c['in_channels']} x {res // 8} x {res // 8}, "
            f"{(res // 8 // c['patch_size']) ** 2} image tokens), 77 CLIP + {job.text.t5_max_length} T5 text tokens "
            f"of width {c['joint_attention_dim']}, pooled {c['pooled_projection_dim']}; LoRA rank {job.lora.rank} "
            f"({job.lora.targets}); otherwise jobs/tiny.yaml ({job.model.dtype}, {t.optimizer}, clip at "
            f"{t.max_grad_norm}); CPU, one process, one torch thread")


def quanto_paragraph(res: dict[str, dict[str, int]], base: dict[str, int]) -> str:
    """How the quanto rows were counted, and what quanto's linear keeps for backward."""
    stock = "; ".join(f"{name.split(' ')[0]}: static {r['static_stock']:,} (x{r['static_stock'] / base['static']:.2f}), "
                      f"peak {r['peak_stock']:,} (x{r['peak_stock'] / base['peak']:.2f})"
                      for name, r in res.items() if "static_stock" in r)
    return (
        "quanto: `PeakTensorMemory.track` counts a tensor by `untyped_storage()`, which for quanto's quantised "
        "weights (tensor subclasses) is a placeholder the size of the full-precision weight, so the stock tracker "
        f"sees no saving, only the added scales ({stock}). The rows above count a subclass by its inner tensors "
        "(`__tensor_flatten__`: int8 data and scales; int4 packed uint8 data, scales and shifts). Temporaries "
        "inside quanto's own ops (`quanto::qbytes_mm`) are invisible to a dispatch mode, which sees each call as "
        "one op. And quanto's linear (its autograd Function) saves its input for backward on every quantised layer "
        "although the frozen weight never gets a gradient, where a frozen nn.Linear saves none: with LoRA on every "
        "linear (`all`) the adapters keep most of those inputs anyway (what remains is the attention output, "
        "which quanto keeps whole where the adapters keep a contiguous copy of each stream's slice), but with "
        "LoRA on attention only the feed-forward layers' inputs become extra activations:")


def interpretation(res: dict[str, dict[str, int]], base: dict[str, int], job) -> str:
    """What the table shows, from its own figures."""
    def peak(name: str) -> str:
        return f"x{res[name]['peak'] / base['peak']:.2f}"

    rest = base["peak"] - base["static"] - base["optimizer_state"]
    text, image = 77 + job.text.t5_max_length, (job.data.datasets[0].resolution // 16) ** 2  # /8 VAE, 2x2 patches
    return (
        f"What it shows: relative effects on a toy shape, not the savings on SD3/SD3.5. The tiny model's fixed "
        f"costs dominate: of its {base['static']:,} static bytes, {base['buffers']:,} are the sin-cos position "
        f"table (a buffer that only model.dtype shrinks) and {base['lora']:,} the LoRA, so quantising the blocks' "
        f"linears cuts static bytes by only {1 - res['int8 base (quanto)']['static'] / base['static']:.0%} (int8) "
        f"and {1 - res['int4 base (quanto)']['static'] / base['static']:.0%} (int4); and its "
        f"{text} text tokens outnumber its {image} image tokens {text / image:.0f} to 1, so the "
        f"{rest:,} bytes of batch, activations and gradients are mostly the text stream's. What halves activation "
        f"width helps most: bf16 autocast {peak('bf16 autocast')}, a bf16 base {peak('bf16 base')}. Gradient "
        f"checkpointing ({peak('gradient checkpointing')}) trades little here: with 2 blocks the peak moves to "
        "recomputing the first block, which holds most of the activations (the last block has no text "
        "feed-forward). Lion keeps one moment instead of AdamW's two (state "
        f"x{res['lion']['optimizer_state'] / base['optimizer_state']:.2f}, peak {peak('lion')}) and StableAdamW "
        "as much as AdamW; a bf16 LoRA halves the adapter, while adamw_bf16 keeps its moments in fp32. On a real "
        "model the base weights and activations are gigabytes and the LoRA's optimizer state a small part, and "
        "these are tensor bytes, not GPU memory (no CUDA context, no allocator rounding): for real sizes use "
        "`python -m raytune_sd3.check` (raytune_sd3.memory.estimate).")


if __name__ == "__main__":
    main()
