"""Time from command to first optimizer step of `python -m raytune_sd3.train jobs/tiny.yaml`, cache warm, in phases.

    python benchmarks/overhead.py                 # jobs/tiny.yaml as it is (2 workers), eval and validation off

What is measured, each a median over --repeats (one untimed run first fills the cache):
  end to end   the real CLI in a subprocess: from starting it to the first line of metrics.jsonl (step 1)
  phases       the CLI's own sequence run in this process, timed piece by piece:
                 imports            a fresh `python -c "import <what the CLI imports>"`, start to exit
                 config             load_job, check_paths, guard_resume, job.yaml, resolve_pretrained
                 Ray start          init_ray (a new local Ray)
                 data               prepare_data with every entry a cache hit (demo images, Ray Data pass, manifest)
                 workers start      build_trainer + fit() until the train function starts in the worker (controller,
                                    placement group, worker actors, torch.distributed)
                 model load         load_transformer in the worker (rank 0)
                 setup              the rest until the first batch is read: LoRA, DDP, optimizer, reader
                 first step         first batch read to first ray.train.report (the step, metrics.jsonl)
  baseline     reference.py (the bare diffusers-style loop) in a subprocess: start to end of its first step
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    RESULTS,
    ROOT,
    TINY_JOB,
    bench_job,
    bench_overrides,
    command,
    machine,
    machine_line,
    median,
    prepare,
    run_job,
    table,
    write_section,
)

CLI_IMPORTS = ("raytune_sd3.driver.training, raytune_sd3.driver.caching, raytune_sd3.driver.runtime, "
               "raytune_sd3.models.loading, raytune_sd3.train.loop, ray.train.torch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of jobs/tiny.yaml (repeatable)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def time_cli(workdir: Path, extra: list[str]) -> float:
    """Seconds from starting `python -m raytune_sd3.train` to step 1 in its metrics.jsonl (then it runs to its end)."""
    sets = [a for o in bench_overrides(workdir, extra) for a in ("--set", o)]
    metrics = Path(bench_job(workdir, extra).output_dir) / "metrics.jsonl"
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "raytune_sd3.train", str(TINY_JOB), *sets], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = None
    while first is None and proc.poll() is None:
        if metrics.exists() and metrics.read_text().strip():
            first = time.time() - t0
        time.sleep(0.02)
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"python -m raytune_sd3.train failed (exit {proc.returncode}); run it by hand to see why")
    return first


def time_imports() -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-c", f"import {CLI_IMPORTS}"], check=True, cwd=ROOT)
    return time.time() - t0


def time_phases(workdir: Path, extra: list[str]) -> dict:
    """The CLI's main() step by step in this process (imports already done), with the workers timed inside."""
    import ray

    from raytune_sd3.config import dump_job
    from raytune_sd3.driver.preflight import check_paths
    from raytune_sd3.driver.resume import guard_resume
    from raytune_sd3.testmodels.resolve import resolve_pretrained

    t0 = time.time()
    cfg = bench_job(workdir, extra)
    check_paths(cfg)
    guard_resume(cfg, restart=False)
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.output_dir) / "job.yaml").write_text(dump_job(cfg))
    resolve_pretrained(cfg.model.pretrained)
    t1 = time.time()
    from raytune_sd3.driver.runtime import init_ray

    init_ray(cfg)
    t2 = time.time()
    manifest, pretrained = prepare(cfg)  # Ray is up: this is prepare_data
    t3 = time.time()
    run = run_job(cfg, manifest, pretrained)
    ray.shutdown()
    return {"config": t1 - t0, "Ray start": t2 - t1, "data": t3 - t2, **run.startup()}


def time_bare(workdir: Path, extra: list[str]) -> float:
    """Seconds from starting reference.py (one step) to the end of its first step."""
    cfg = bench_job(workdir, extra)
    from raytune_sd3.run_layout import MANIFEST

    manifest = Path(cfg.output_dir) / MANIFEST
    if not manifest.exists():
        raise RuntimeError(f"{manifest} is missing: run the job first")
    job, out = workdir / "reference-job.json", workdir / "reference.json"
    job.write_text(json.dumps(cfg.model_dump(mode="json")))
    from raytune_sd3.testmodels.resolve import resolve_pretrained

    t0 = time.time()
    subprocess.run([sys.executable, str(Path(__file__).with_name("reference.py")), str(job), str(manifest),
                    resolve_pretrained(cfg.model.pretrained), "--steps", "1", "--threads",
                    str(max(1, int(cfg.train.cpus_per_worker))), "--out", str(out)], check=True)
    return json.loads(out.read_text())["first_step_done"] - t0


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import raytune_sd3.driver.training  # noqa: F401  the imports are timed in a subprocess, not here
    import raytune_sd3.train.loop  # noqa: F401

    workdir = Path(tempfile.mkdtemp(prefix="raytune_sd3-bench-overhead-"))
    extra = [*args.overrides, "train.max_steps=2"]
    phases, cli, bare, imports = [], [], [], []
    try:
        time_cli(workdir, [*extra, f"output_dir={workdir / 'warm'}"])  # untimed: fills the cache
        for r in range(args.repeats):
            imports.append(time_imports())
            phases.append(time_phases(workdir, [*extra, f"output_dir={workdir / f'phases{r}'}"]))
            cli.append(time_cli(workdir, [*extra, f"output_dir={workdir / f'cli{r}'}"]))
            bare.append(time_bare(workdir, [*extra, f"output_dir={workdir / f'phases{r}'}"]))
            print(f"repeat {r + 1}/{args.repeats}: CLI {cli[-1]:.1f} s to step 1, bare loop {bare[-1]:.1f} s; "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in {"imports": imports[-1], **phases[-1]}.items()),
                  flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    split = {"imports": median(imports), **{k: median([p[k] for p in phases]) for k in phases[0]}}
    total, cli_s, bare_s = sum(split.values()), median(cli), median(bare)
    rows = [[k, f"{v:.2f}", f"{v / total:.0%}"] for k, v in split.items()]
    rows += [["**sum of phases**", f"**{total:.2f}**", "100%"],
             ["end to end (CLI to step 1 in metrics.jsonl)", f"{cli_s:.2f}", ""],
             ["baseline: bare loop (reference.py) to end of step 1", f"{bare_s:.2f}", ""]]
    cfg = bench_job(workdir, extra)
    res = {"phases": split, "sum_s": total, "cli_s": cli_s, "bare_s": bare_s, "ratio": cli_s / bare_s}
    body = "\n\n".join([
        command("overhead.py", argv), f"{machine_line(machine())}.",
        f"Setup: jobs/tiny.yaml ({cfg.train.num_workers} workers, {cfg.model.pretrained}), warm cache, eval and "
        f"validation off. Medians of {args.repeats} runs; the phases are the CLI's own sequence run and timed "
        "in one process (see the script's docstring), the end-to-end figure is the real CLI.",
        table(["phase", "s", "share"], rows),
        f"CLI / bare loop, command to first step = **{res['ratio']:.1f}x**."])
    print(body)
    if not args.no_write:
        write_section("overhead: command to first step", body, args.results)
    return res


if __name__ == "__main__":
    main()
