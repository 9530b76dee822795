"""Our training step, inside a Ray Train worker as the job runs it, against a bare reference loop (reference.py: the
diffusers-script way) on the same tiny model, batch, resolution and T5 length, in the same run.

    python benchmarks/step.py                     # jobs/tiny.yaml with 1 worker; target: ours/reference <= 1.05
    python benchmarks/step.py --set data.datasets.0.resolution=128 --set text.t5_max_length=154

The reference runs in our worker, interleaved: one reference step at the start of each of ours, on the same thread
(so with the worker's torch threads and niceness). On this shared VM the speed of a core drifts between two levels
about 1.6x apart, in phases of a few seconds, independently per core (measured: two copies of reference.py run at
once had medians of 33 and 45 ms per step), so separate runs of ours and the reference compared unlike conditions.
Paired steps moments apart see the same conditions; the headline is the median over steps of ours_k / reference_k.

Ours is timed two ways on rank 0, excluding the first --warmup steps and the last (checkpoint) step, with the
reference step taken out:
  in-step   the loop's own step_time_s (metrics.jsonl): data read, forward, backward, clip, AdamW, LR step
  period    start of step k to start of step k+1: the above plus metrics.jsonl and ray.train.report, i.e. what
            the run's wall time is made of
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from common import RESULTS, bench_job, command, machine, machine_line, median, prepare, run_job, table, write_section

TARGET = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (default 60)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="runs (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of jobs/tiny.yaml (repeatable); train.num_workers is 1")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def paired(ours: list[float], reference: list[float]) -> float:
    """Median over steps of ours_k / reference_k."""
    return median([a / b for a, b in zip(ours, reference, strict=True)])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.steps < args.warmup + 3:
        raise SystemExit(f"--steps must be at least --warmup + 3 (got {args.steps}, warmup {args.warmup})")
    import ray

    workdir = Path(tempfile.mkdtemp(prefix="raytune_sd3-bench-step-"))
    overrides = [*args.overrides, "train.num_workers=1", f"train.max_steps={args.steps}"]
    runs = []  # per repeat: {figure: median}
    try:
        manifest, pretrained = prepare(bench_job(workdir, overrides))
        for r in range(args.repeats):
            cfg = bench_job(workdir, [*overrides, f"output_dir={workdir / f'run{r}'}"])
            run = run_job(cfg, manifest, pretrained, with_reference=True)
            env = {k: run.ranks[0][k] for k in ("threads", "omp", "nice")}
            w = args.warmup
            in_step = run.in_step(w)
            ref_in_step = run.durations("reference", w)[: len(in_step)]  # the reference step inside each of ours
            # Most steps make no ray.train.report (train.report_every): a median of the steps' report time is
            # 0 then, not NaN; the mean shows what the few reports cost per step.
            runs.append({"in_step": median(in_step), "period": median(run.periods(w)),
                         "report": run.per_step("report", w), "data": median(run.durations("data", w)),
                         "cpu_period": median(run.cpu_periods(w)), "cpu_report": run.per_step("report", w, True),
                         "cpu_data": median(run.durations("data", w, True)),
                         "ref": median(run.reference(w)), "cpu_ref": median(run.reference(w, cpu=True)),
                         "ratio_period": paired(run.periods(w), run.reference(w)),
                         "ratio_cpu_period": paired(run.cpu_periods(w), run.reference(w, cpu=True)),
                         "ratio_in_step": paired(in_step, ref_in_step)})
            m = runs[-1]
            print(f"repeat {r + 1}/{args.repeats}: ours in-step {m['in_step'] * 1e3:.1f} ms, step to step "
                  f"{m['period'] * 1e3:.1f} ms ({m['cpu_period'] * 1e3:.1f} ms CPU); reference {m['ref'] * 1e3:.1f} "
                  f"ms ({m['cpu_ref'] * 1e3:.1f} ms CPU); paired ratio {m['ratio_period']:.3f} "
                  f"({m['ratio_cpu_period']:.3f} CPU); worker: {env['threads']} torch threads, "
                  f"OMP_NUM_THREADS={env['omp']}, nice {env['nice']}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    m = {k: median([run[k] for run in runs]) for k in runs[0]}
    m["cpu_in_step"] = median([run["cpu_period"] - run["cpu_report"] for run in runs])
    res = {**m, "worker": env}

    def row(name, wall, cpu, ratio="", cpu_ratio=""):
        return [name, f"{wall * 1e3:.1f}", f"{cpu * 1e3:.1f}", ratio, cpu_ratio]

    rows = [row("reference (bare loop, reference.py), interleaved", m["ref"], m["cpu_ref"], "1", "1"),
            row("ours, in-step (the loop's step_time_s)", m["in_step"], m["cpu_in_step"],
                f"{m['ratio_in_step']:.3f}"),
            row("**ours, step to step**", m["period"], m["cpu_period"], f"**{m['ratio_period']:.3f}**",
                f"{m['ratio_cpu_period']:.3f}"),
            row("  of which in ray.train.report", m["report"], m["cpu_report"]),
            row("  of which reading the batch (Prefetcher.get)", m["data"], m["cpu_data"])]
    t = cfg.train
    setup = (f"{cfg.model.pretrained}, batch {t.batch_size}, {cfg.data.datasets[0].resolution}px, "
             f"T5 {cfg.text.t5_max_length} tokens, LoRA rank {cfg.lora.rank} ({cfg.lora.targets}), AdamW, "
             f"{cfg.model.dtype}; 1 worker = {env['threads']} torch thread (OMP_NUM_THREADS={env['omp']}, "
             f"nice {env['nice']}), the reference on the same thread")
    verdict = "meets" if res["ratio_period"] <= TARGET else "misses"
    body = "\n\n".join([
        command("step.py", argv), f"{machine_line(machine())}.",
        f"Setup: {setup}. {args.repeats} runs of {args.steps} steps, each of ours preceded by one reference step "
        f"in the same worker thread; the first {args.warmup} steps and the last (checkpoint) step excluded. "
        "Ratios are medians over steps of ours_k / reference_k (pairs measured moments apart, so the drift of "
        "this shared VM's speed cancels), then the median over runs; ms figures are medians. Thread CPU = CPU "
        "seconds of the training thread (time.thread_time); ours' in-step CPU is step to step minus the report.",
        table(["", "wall ms/step", "thread CPU ms/step", "ours/reference, wall", "ours/reference, CPU"], rows),
        f"ours/reference, wall step to step = **{res['ratio_period']:.3f}**: {verdict} the target of <= {TARGET}; "
        f"thread CPU {res['ratio_cpu_period']:.3f}."])
    print(body)
    if not args.no_write:
        write_section("step: ours vs reference", body, args.results)
    return res


if __name__ == "__main__":
    main()
