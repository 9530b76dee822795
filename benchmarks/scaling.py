"""Images/s of the real job with 1 and 2 workers (CPU here, one thread each), and DDP's communication per step.

    python benchmarks/scaling.py                  # jobs/tiny.yaml, --set train.num_workers=1 and =2
    python benchmarks/scaling.py --workers 1 2 4 --set train.batch_size=8

For each worker count, on rank 0 after the first --warmup steps:
  images/s (compute)  global batch / the loop's step_time_s (data, forward, backward with DDP's all-reduce, AdamW)
  images/s (wall)     global batch / the start-to-start time of consecutive steps (adds metrics and ray.train.report)
  all-reduce          a gloo all_reduce of a tensor as large as the LoRA's gradient, timed in every worker after
                      training (DDP reduces exactly that much per step, in buckets), median over 25 calls
The scaling ratio is images/s at N workers over images/s at 1 worker (ideal: N), from the same run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import RESULTS, bench_job, command, machine, machine_line, median, prepare, run_job, table, write_section


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default 1 2)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures (default 5)")
    p.add_argument("--repeats", type=int, default=2, help="runs per worker count, alternating (default 2)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of jobs/tiny.yaml (repeatable)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def measure(cfg, manifest: Path, pretrained: str, warmup: int) -> dict:
    run = run_job(cfg, manifest, pretrained)
    images = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.num_workers
    allreduce = [median(r["allreduce_s"]) for r in run.ranks if "allreduce_s" in r]
    return {"compute": images / median(run.in_step(warmup)), "wall": images / median(run.periods(warmup)),
            "allreduce_s": max(allreduce) if allreduce else 0.0, "lora_numel": run.ranks[0]["lora_numel"],
            "threads": run.ranks[0]["threads"]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.steps < args.warmup + 3:
        raise SystemExit(f"--steps must be at least --warmup + 3 (got {args.steps}, warmup {args.warmup})")
    import ray

    workdir = Path(tempfile.mkdtemp(prefix="raytune_sd3-bench-scaling-"))
    overrides = [*args.overrides, f"train.max_steps={args.steps}"]
    runs: dict[int, list[dict]] = {n: [] for n in args.workers}
    try:
        manifest, pretrained = prepare(bench_job(workdir, overrides))
        for r in range(args.repeats):
            for n in args.workers:
                cfg = bench_job(workdir, [*overrides, f"train.num_workers={n}", f"output_dir={workdir / f'w{n}-{r}'}"])
                runs[n].append(measure(cfg, manifest, pretrained, args.warmup))
                m = runs[n][-1]
                print(f"repeat {r + 1}/{args.repeats}, {n} worker(s): {m['compute']:.1f} images/s compute, "
                      f"{m['wall']:.2f} images/s wall, all-reduce {m['allreduce_s'] * 1e3:.2f} ms", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    base = args.workers[0]
    res = {n: {k: median([m[k] for m in ms]) for k in ("compute", "wall", "allreduce_s")} for n, ms in runs.items()}
    rows = []
    for n, m in res.items():
        step_ms = cfg.train.batch_size * n / m["compute"] * 1e3
        rows.append([n, f"{m['compute']:.1f}", f"{m['compute'] / res[base]['compute']:.2f}", f"{m['wall']:.2f}",
                     f"{m['wall'] / res[base]['wall']:.2f}",
                     f"{m['allreduce_s'] * 1e3:.2f} ({m['allreduce_s'] * 1e3 / step_ms:.0%} of a step)" if n > 1
                     else "-"])
    t = cfg.train
    numel = runs[args.workers[-1]][0]["lora_numel"]
    body = "\n\n".join([
        command("scaling.py", argv), f"{machine_line(machine())}.",
        f"Setup: {cfg.model.pretrained}, batch {t.batch_size} per worker, {cfg.data.datasets[0].resolution}px, "
        f"T5 {cfg.text.t5_max_length} tokens, LoRA rank {cfg.lora.rank} ({cfg.lora.targets}: {numel:,} "
        f"parameters, {numel * 4 / 1e6:.2f} MB of fp32 gradient), 1 CPU = {runs[base][0]['threads']} torch thread "
        f"per worker, gloo. Medians of {args.repeats} runs of {args.steps} steps, first {args.warmup} excluded.",
        table(["workers", "images/s (compute)", f"x {base} worker", "images/s (wall)", f"x {base} worker",
               "all-reduce / step, ms"], rows)])
    print(body)
    if not args.no_write:
        write_section("scaling: 1 and 2 workers", body, args.results)
    return res


if __name__ == "__main__":
    main()
