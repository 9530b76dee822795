"""Our training step, inside a Ray Train worker as the job runs it, against a bare reference loop (reference.py: the
diffusers-script way) on the same tiny model, batch, resolution and T5 length, in the same run.

    python benchmarks/step.py                     # jobs/tiny.yaml with 1 worker; target: ours/reference <= 1.05
    python benchmarks/step.py --set data.datasets.0.resolution=128 --set text.t5_max_length=154

Ours is timed two ways, both on rank 0, excluding the first --warmup steps and the last (checkpoint) step:
  in-step   the loop's own step_time_s (metrics.jsonl): data read, forward, backward, clip, AdamW, LR step
  period    start of step k to start of step k+1: the above plus metrics.jsonl and ray.train.report, i.e. what
            the run's wall time is made of
The reference runs in its own process with the torch thread count and niceness our worker had (Ray sets
OMP_NUM_THREADS to the worker's CPUs and starts workers at niceness 15). Repeats alternate ours and reference;
the figures are medians over the repeats of per-repeat medians.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, bench_job, command, machine, machine_line, median, prepare, run_job, table, write_section

TARGET = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run of ours (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the figures (default 5)")
    p.add_argument("--reference-steps", type=int, default=60, help="steps per reference run (default 60)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of jobs/tiny.yaml (repeatable); train.num_workers is 1")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def run_reference(cfg, manifest: Path, pretrained: str, steps: int, threads: int, nice: int, workdir: Path) -> dict:
    job = workdir / "reference-job.json"
    job.write_text(json.dumps(cfg.model_dump(mode="json")))
    out = workdir / "reference.json"
    subprocess.run([sys.executable, str(Path(__file__).with_name("reference.py")), str(job), str(manifest),
                    pretrained, "--steps", str(steps), "--threads", str(threads), "--nice", str(nice),
                    "--out", str(out)], check=True)
    return json.loads(out.read_text())


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
            run = run_job(cfg, manifest, pretrained)
            env = {k: run.ranks[0][k] for k in ("threads", "omp", "nice")}
            ref = run_reference(cfg, manifest, pretrained, args.reference_steps, env["threads"], env["nice"], workdir)
            w = args.warmup
            # Most steps make no ray.train.report (train.report_every): a median of the steps' report time is
            # 0 then, not NaN; the mean shows what the few reports cost per step.
            runs.append({"in_step": median(run.in_step(w)), "period": median(run.periods(w)),
                         "report": run.per_step("report", w), "data": median(run.durations("data", w)),
                         "cpu_period": median(run.cpu_periods(w)), "cpu_report": run.per_step("report", w, True),
                         "cpu_data": median(run.durations("data", w, True)),
                         "ref": median(ref["step_s"][w:]), "cpu_ref": median(ref["step_cpu_s"][w:])})
            m = runs[-1]
            print(f"repeat {r + 1}/{args.repeats}: ours in-step {m['in_step'] * 1e3:.1f} ms, step to step "
                  f"{m['period'] * 1e3:.1f} ms ({m['cpu_period'] * 1e3:.1f} ms CPU); reference {m['ref'] * 1e3:.1f} "
                  f"ms ({m['cpu_ref'] * 1e3:.1f} ms CPU); worker: {env['threads']} torch threads, "
                  f"OMP_NUM_THREADS={env['omp']}, nice {env['nice']}; reference: {ref['threads']} threads, "
                  f"nice {ref['nice']}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)

    m = {k: median([run[k] for run in runs]) for k in runs[0]}
    m["cpu_in_step"] = median([run["cpu_period"] - run["cpu_report"] for run in runs])
    res = {**m, "ratio_period": m["period"] / m["ref"], "ratio_in_step": m["in_step"] / m["ref"],
           "ratio_cpu_in_step": m["cpu_in_step"] / m["cpu_ref"], "worker": env}

    def row(name, wall, cpu):
        return [name, f"{wall * 1e3:.1f}", f"{wall / m['ref']:.2f}", f"{cpu * 1e3:.1f}", f"{cpu / m['cpu_ref']:.2f}"]

    rows = [row("reference (bare loop, reference.py)", m["ref"], m["cpu_ref"]),
            row("ours, in-step (the loop's step_time_s)", m["in_step"], m["cpu_in_step"]),
            row("**ours, step to step**", m["period"], m["cpu_period"]),
            row("  of which in ray.train.report", m["report"], m["cpu_report"]),
            row("  of which waiting for the batch (read ahead)", m["data"], m["cpu_data"])]
    t = cfg.train
    setup = (f"{cfg.model.pretrained}, batch {t.batch_size}, {cfg.data.datasets[0].resolution}px, "
             f"T5 {cfg.text.t5_max_length} tokens, LoRA rank {cfg.lora.rank} ({cfg.lora.targets}), AdamW, "
             f"{cfg.model.dtype}; 1 worker = {env['threads']} torch thread (OMP_NUM_THREADS={env['omp']}, "
             f"nice {env['nice']}), the reference run with the same")
    verdict = "meets" if res["ratio_period"] <= TARGET else "misses"
    body = "\n\n".join([
        command("step.py", argv), f"{machine_line(machine())}.",
        f"Setup: {setup}. Medians over {args.repeats} alternating runs of per-run medians (ours {args.steps} "
        f"steps, reference {args.reference_steps}; the first {args.warmup} and ours' last step excluded). Thread "
        "CPU = CPU seconds of the training thread (time.thread_time), which other load on the machine does not "
        "inflate; ours' in-step CPU is step to step minus the report.",
        table(["", "wall ms/step", "x reference", "thread CPU ms/step", "x reference"], rows),
        f"ours/reference, wall step to step = **{res['ratio_period']:.2f}**: {verdict} the target of <= {TARGET}; "
        f"in-step thread CPU ratio {res['ratio_cpu_in_step']:.2f}."])
    print(body)
    if not args.no_write:
        write_section("step: ours vs reference", body, args.results)
    return res


if __name__ == "__main__":
    main()
