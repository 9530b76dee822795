"""Transformer load time: the project's load_transformer against diffusers' from_pretrained, on a shaped pipeline.

    python benchmarks/load.py                              # SD3.5 Medium shape (builds 4.7 GB of random weights once)
    python benchmarks/load.py --shape sd35-large --pipeline /path/to/pipeline

Every training worker loads the transformer before its first step. Both sides load the same bf16 checkpoint from
the same folder in the same process, interleaved (`--repeats` pairs; the page cache is warm after the first):
  diffusers  SD3Transformer2DModel.from_pretrained(..., torch_dtype=bfloat16), as a diffusers script loads it
  ours       raytune_sd3.models.loading.load_transformer, which reads the position table from the checkpoint
             instead of computing it in float64 first (diffusers' PatchEmbed does, and loading overwrites it)
Weights are memory-mapped by both: reading them into the GPU (`.to(device)`) is the same for both and not timed.
Peak memory (VmHWM, the process's peak RSS, imports included) is taken from one fresh process per side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, command, machine, machine_line, median, table, write_section

# A child's peak RSS starts at its parent's (Linux copies the high-water mark at fork): reset it first.
CHILD = """
import re, sys, torch
from diffusers import SD3Transformer2DModel
from raytune_sd3.models.loading import load_transformer
open("/proc/self/clear_refs", "w").write("5")
if sys.argv[2] == "ours":
    load_transformer(sys.argv[1], torch.bfloat16)
else:
    SD3Transformer2DModel.from_pretrained(sys.argv[1], subfolder="transformer", torch_dtype=torch.bfloat16)
print(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="sd35-medium", help="shaped pipeline to build (default sd35-medium)")
    p.add_argument("--pipeline", type=Path, default=None,
                   help="an existing pipeline folder (default: build one under ~/.cache/raytune_sd3/bench)")
    p.add_argument("--repeats", type=int, default=3, help="timed pairs (default 3)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def max_rss_gib(pipeline: Path, side: str) -> float:
    run = subprocess.run([sys.executable, "-c", CHILD, str(pipeline), side], capture_output=True, text=True,
                         check=True)
    return int(run.stdout.strip().splitlines()[-1]) / (1 << 20)


def main(argv: list[str] | None = None) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel

    from raytune_sd3.models.loading import load_transformer
    from raytune_sd3.testmodels.shaped import build_shaped_pipeline

    args = parse_args(argv)
    pipeline = args.pipeline or Path.home() / ".cache" / "raytune_sd3" / "bench" / f"pipeline-{args.shape}"
    if args.pipeline is None:
        t0 = time.perf_counter()
        build_shaped_pipeline(pipeline, args.shape, device="cpu")
        print(f"pipeline {pipeline} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    sides = {
        "diffusers": lambda: SD3Transformer2DModel.from_pretrained(pipeline, subfolder="transformer",
                                                                   torch_dtype=torch.bfloat16),
        "ours": lambda: load_transformer(str(pipeline), torch.bfloat16),
    }
    times: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side, load in sides.items():
            t0 = time.perf_counter()
            model = load()
            times[side].append(time.perf_counter() - t0)
            del model
    rss = {side: max_rss_gib(pipeline, side) for side in sides}
    base = median(times["diffusers"])
    rows = [[side, f"{median(t):.2f}", f"{median(t) / base:.3f}", f"{rss[side]:.2f}"] for side, t in times.items()]
    info = machine()
    config = json.loads((pipeline / "transformer" / "config.json").read_text())
    body = (f"Measured {machine_line(info)}. Command: {command('load.py', argv)}. Transformer of shape "
            f"{args.shape if args.pipeline is None else pipeline.name} ({config['num_layers']} blocks, "
            f"{config['num_attention_heads'] * config['attention_head_dim']} wide, pos_embed_max_size "
            f"{config['pos_embed_max_size']}), bf16, random weights; medians of {args.repeats} interleaved loads "
            f"in one process; peak memory (VmHWM) from one fresh process per side.\n\n"
            + table(["load", "seconds", "ours/diffusers", "max RSS of a process that loads it (GiB)"], rows) + "\n")
    print(body)
    if not args.no_write:
        write_section(f"model load: the transformer, ours vs diffusers ({info['cores']} CPU cores)", body,
                      args.results)
    return {side: median(t) for side, t in times.items()}


if __name__ == "__main__":
    main()
