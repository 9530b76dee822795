"""The stability study: the `tune:` section, search space -> Tune, trial status, the report, and whole studies
through the real CLI (local Ray, tiny SD3, Tune trials that each fit a Train V2 TorchTrainer)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from raytune_sd3.config import ConfigError, dump_job, load_job
from raytune_sd3.run_layout import MANIFEST
from raytune_sd3.tune.config import check_study, job_for_params, study_base
from raytune_sd3.tune.report import TrialRecord, best_trial, trial_record, write_report

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_study_raw(**tune) -> dict:
    raw = yaml.safe_load((ROOT / "jobs" / "tune-tiny.yaml").read_text())
    raw["tune"].update(tune)
    return raw


# --- config ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tune-tiny.yaml", "tune-sd35.yaml"])
def test_shipped_studies_validate(name):
    cfg = load_job(ROOT / "jobs" / name)
    tc = check_study(cfg)
    if name == "tune-tiny.yaml":
        lrs = [p["train.learning_rate"] for p in tc.trials]
        assert len(lrs) == 4 and sum(lr >= 1.0 for lr in lrs) == 1  # exactly one absurd learning rate
        assert cfg.train.divergence_factor and cfg.train.grad_norm_limit
    else:
        assert tc.search == "random" and tc.space["train.learning_rate"].loguniform == (5e-6, 1e-4)
        assert tc.space["train.max_grad_norm"].choice == [0.1, 0.5, 1.0]
        assert tc.space["flow.shift"].choice == [1.0, 3.0, "auto"]
        assert tc.scheduler.type == "asha"


def test_bad_studies_are_refused_with_the_key_named():
    raw = tiny_study_raw(space={"train.learning_rat": {"loguniform": [1e-5, 1e-3]}}, num_trials=2)
    with pytest.raises(ConfigError, match=r"train\.learning_rat: no such job key \(did you mean 'learning_rate'"):
        load_job(raw=raw)
    raw = tiny_study_raw(space={"text.t5_max_length": {"choice": [77, 154]}}, num_trials=2)
    with pytest.raises(ConfigError, match="trials share one cache"):
        load_job(raw=raw)
    raw = tiny_study_raw(space={"train.learning_rate": {"loguniform": [1e-5, 1e-3]}})
    with pytest.raises(ConfigError, match="num_trials"):
        load_job(raw=raw)
    raw = tiny_study_raw(search="grid", trials=[], space={"train.learning_rate": {"loguniform": [1e-5, 1e-3]}})
    with pytest.raises(ConfigError, match="grid crosses choice lists"):
        load_job(raw=raw)
    # a value the job refuses is caught before Ray starts, naming where it came from
    cfg = load_job(raw=tiny_study_raw(space={"flow.shift": {"choice": [1.0, -2.0]}}, num_trials=2))
    with pytest.raises(ConfigError, match=r"tune\.space\.flow\.shift.*shift must be > 0"):
        check_study(cfg)
    raw = tiny_study_raw()
    raw["train"]["eval_every"] = None
    with pytest.raises(ConfigError, match="train.eval_every: ASHA compares eval losses"):
        check_study(load_job(raw=raw))


def test_tune_section_round_trips_through_the_dump():
    cfg = load_job(ROOT / "jobs" / "tune-sd35.yaml")
    assert cfg.tune.space["train.max_grad_norm"].choice == [0.1, 0.5, 1.0]  # typed like every other section
    dumped = yaml.safe_load(dump_job(cfg))["tune"]
    assert dumped["space"]["train.max_grad_norm"] == {"choice": [0.1, 0.5, 1.0]}  # no null siblings
    assert load_job(raw={**yaml.safe_load(dump_job(cfg))}).tune == cfg.tune


def test_trial_job_sets_the_keys_and_shares_the_cache(tmp_path):
    cfg = load_job(ROOT / "jobs" / "tune-tiny.yaml", [f"output_dir={tmp_path / 'study'}"])
    job = job_for_params(study_base(cfg), {"train.learning_rate": 3e-3, "flow.shift": "auto"},
                         tmp_path / "study" / "trials" / "t1")
    assert job.train.learning_rate == 3e-3 and job.flow.shift == "auto"
    assert job.tune is None and job.run_name == "t1"
    assert Path(job.cache_dir) == tmp_path / "study" / "cache"


def test_optimizers_and_their_settings_are_trial_keys(tmp_path):
    """The optimiser is a trial key (explicit trials: each has its own learning-rate scale) and Prodigy's settings
    are search dimensions; a trial the job's rules refuse (schedule-free under a decaying schedule) is caught before
    Ray starts, naming the key and the fix."""
    raw = tiny_study_raw(space={"train.prodigy.d_coef": {"choice": [0.5, 1.0, 2.0]}}, num_trials=2, trials=[
        {"train.optimizer": "prodigy", "train.learning_rate": 1.0, "train.prodigy.d_coef": 2.0},
        {"train.optimizer": "adamw_schedulefree", "train.learning_rate": 1.0e-2}])
    raw["output_dir"] = str(tmp_path / "study")
    cfg = load_job(raw=raw)
    check_study(cfg)
    job = job_for_params(study_base(cfg), cfg.tune.trials[0], tmp_path / "study" / "trials" / "t1")
    assert (job.train.optimizer, job.train.learning_rate, job.train.prodigy.d_coef) == ("prodigy", 1.0, 2.0)
    raw["train"]["lr_scheduler"] = "cosine"
    with pytest.raises(ConfigError, match=r"tune\.trials.*train\.optimizer adamw_schedulefree replaces the LR "
                                          r"schedule.*train\.lr_scheduler: constant"):
        check_study(load_job(raw=raw))


# --- search space, concurrency, the objective ----------------------------------------------------------------------

def test_search_space_and_searchers():
    from ray import tune

    from raytune_sd3.tune.study import make_asha, make_search_alg, search_space

    cfg = load_job(ROOT / "jobs" / "tune-sd35.yaml")
    tc = check_study(cfg)
    space = search_space(tc, study_base(cfg))
    assert isinstance(space["train.learning_rate"], tune.search.sample.Float)
    assert space["train.learning_rate"].lower == 5e-6 and space["train.learning_rate"].upper == 1e-4
    assert space["flow.shift"].categories == [1.0, 3.0, "auto"]
    searcher = make_search_alg(tc, study_base(cfg), max_concurrent=3)
    assert type(searcher).__name__ == "BasicVariantGenerator" and searcher.max_concurrent == 3
    asha = make_asha(tc, cfg.train.max_steps)
    assert asha._time_attr == "step" and asha._max_t == 600 and asha._stop_last_trials is False

    tiny = load_job(ROOT / "jobs" / "tune-tiny.yaml")
    tiny_space = search_space(check_study(tiny), study_base(tiny))
    assert tiny_space == {"train.learning_rate": 1e-2, "train.max_grad_norm": 1.0, "flow.shift": 1.0}  # constants

    grid = load_job(raw=tiny_study_raw(search="grid", trials=[], space={"flow.shift": {"choice": [1.0, "auto"]}}))
    assert search_space(check_study(grid), study_base(grid))["flow.shift"] == {"grid_search": [1.0, "auto"]}


def test_default_concurrency():
    from raytune_sd3.tune.study import default_concurrency

    assert default_concurrency({"CPU": 4}, workers=1, cpus_per_worker=1, use_gpu=None) == 3  # + each trial's actor
    assert default_concurrency({"CPU": 4}, workers=2, cpus_per_worker=1, use_gpu=None) == 1
    assert default_concurrency({"CPU": 64, "GPU": 8}, workers=2, cpus_per_worker=1, use_gpu=None) == 4
    assert default_concurrency({"CPU": 64, "GPU": 8}, workers=3, cpus_per_worker=1, use_gpu=None) == 2
    assert default_concurrency({"CPU": 1}, workers=2, cpus_per_worker=1, use_gpu=None) == 1
    # One GPU (a workstation; num_workers auto -> 1): one trial at a time, never two trainers waiting on one GPU
    assert default_concurrency({"CPU": 16, "GPU": 1}, workers=1, cpus_per_worker=1, use_gpu=True) == 1


def test_objective_carries_the_eval_loss_and_marks_divergence(monkeypatch):
    from raytune_sd3.tune import study

    sent = []
    monkeypatch.setattr(study.TuneReportCallback, "after_report", lambda self, ctx, m, c: sent.append(m[0]))
    cb = study.StudyReportCallback.__new__(study.StudyReportCallback)  # __init__ needs a live Tune session
    cb.metric, cb.latest = "eval_loss", math.nan
    for m in ({"step": 1}, {"step": 2, "eval_loss": 0.5}, {"step": 3}, {"step": 4, "diverged": 1}):
        cb.after_report(None, [m], None)
    objective = [s[study.OBJECTIVE] for s in sent]
    assert math.isnan(objective[0]) and objective[1:] == [0.5, 0.5, study.DIVERGED_OBJECTIVE]


SEARCHER_STUDY = """
import json, sys
import ray, yaml
from ray import tune

from raytune_sd3.config import load_job
from raytune_sd3.tune.config import check_study, study_base
from raytune_sd3.tune.study import OBJECTIVE, make_asha, make_search_alg, search_space

jobs, out, searches = sys.argv[1], sys.argv[2], sys.argv[3:]


def fake_trial(config):  # eval loss falls faster with a larger learning rate, as the objective the study uses
    for step in range(50, 301, 50):
        loss = 1.0 / (1 + step * config["train.learning_rate"] * 100)
        tune.report({"step": step, "eval_loss": loss, OBJECTIVE: loss})


ray.init(address="local", num_cpus=4, include_dashboard=False)  # never a cluster `ray start` left running
for search in searches:  # one after the other, each a study of its own in this one Ray
    raw = yaml.safe_load(open(jobs + "/tune-sd35.yaml"))
    raw["tune"].update(search=search, num_trials=3, trials=[{"train.learning_rate": 1e-4, "flow.shift": "auto"}])
    cfg = load_job(raw=raw)
    tc = check_study(cfg)
    results = tune.Tuner(
        tune.with_resources(fake_trial, {"cpu": 0.01}), param_space=search_space(tc, study_base(cfg)),
        tune_config=tune.TuneConfig(metric=OBJECTIVE, mode="min", search_alg=make_search_alg(tc, study_base(cfg), 2),
                                    scheduler=make_asha(tc, 300), num_samples=tc.total_trials),
        run_config=tune.RunConfig(name=search, storage_path=out, verbose=0)).fit()
    json.dump({"configs": [r.config for r in results], "errors": len(results.errors)},
              open(f"{out}/{search}.json", "w"))
"""
SEARCHERS = ["optuna", "hyperopt"]


@pytest.fixture(scope="module")
def searcher_studies(tmp_path_factory) -> Path:
    """Both optional searchers' studies, one after the other in one Python and one Ray of their own (a Ray start
    and the imports paid once), as a study runs (in the suite's shared Ray, these trials once sat idle for 10
    minutes under load). Returns the folder of `<search>.json`."""
    import importlib.util

    out = tmp_path_factory.mktemp("searchers")
    installed = [s for s in SEARCHERS if importlib.util.find_spec(s)]
    if installed:
        r = subprocess.run([sys.executable, "-c", SEARCHER_STUDY, str(ROOT / "jobs"), str(out), *installed],
                           cwd=ROOT, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return out


@pytest.mark.parametrize("search", SEARCHERS)
def test_optional_searchers_take_the_space_and_explicit_trials(search, searcher_studies):
    """Optuna / HyperOpt (dev dependencies) on the SD3.5 space, with an explicit first trial and ASHA."""
    pytest.importorskip(search)
    result = json.loads((searcher_studies / f"{search}.json").read_text())
    configs = sorted(result["configs"], key=lambda c: c["train.learning_rate"] != 1e-4)
    assert len(configs) == 4 and not result["errors"]
    assert configs[0]["train.learning_rate"] == 1e-4 and configs[0]["flow.shift"] == "auto"
    assert all(5e-6 <= c["train.learning_rate"] <= 1e-4 and c["flow.shift"] in (1.0, 3.0, "auto") for c in configs)


# --- status and report -------------------------------------------------------------------------------------------

def steps(n: int, eval_at=(), **last) -> list[dict]:
    rows = [{"step": s, "loss": 1.0, "eval_loss": 1.0 - s / 100 if s in eval_at else float("nan")}
            for s in range(1, n + 1)]
    rows[-1].update(last)
    return rows


def test_trial_status():
    p = {"train.learning_rate": 1e-3}
    stable = trial_record("a", p, "TERMINATED", steps(10, (5, 10)), "", 10, initial_eval=1.2)
    assert stable.status == "stable" and stable.evals == [(0, 1.2), (5, 0.95), (10, 0.9)]
    assert stable.best_eval == (10, 0.9) and stable.final_eval == (10, 0.9)
    div = trial_record("b", p, "TERMINATED", steps(4, diverged=1, diverged_reason="gradient norm 1e9"), "", 10)
    assert div.status == "diverged" and div.note == "step 4: gradient norm 1e9"
    assert trial_record("c", p, "TERMINATED", steps(5, (5,)), "", 10).status == "stopped"
    failed = trial_record("d", p, "ERROR", steps(2), "ValueError: boom", 10)
    assert failed.status == "failed" and failed.note == "ValueError: boom"
    assert trial_record("e", p, "RUNNING", steps(3), "", 10).status == "unfinished"
    # a trial resumed from its step-4 checkpoint reports steps 5.. again: the later report wins
    resumed = trial_record("f", p, "TERMINATED", steps(6, (5,)) + steps(10, (5, 10))[4:], "", 10)
    assert resumed.status == "stable" and [s for s, _ in resumed.evals] == [5, 10]


def test_report_files_from_records(tmp_path):
    cfg = load_job(ROOT / "jobs" / "tune-tiny.yaml", [f"output_dir={tmp_path}"])
    base, keys = study_base(cfg), ["train.learning_rate", "train.max_grad_norm", "flow.shift"]
    recs = [
        TrialRecord("t0", {"train.learning_rate": 1e-2, "train.max_grad_norm": 1.0, "flow.shift": 1.0}, "stable",
                    last_step=20, evals=[(0, 4.2), (10, 4.0), (20, 3.9)]),
        TrialRecord("t1", {"train.learning_rate": 3e-2, "train.max_grad_norm": 0.1, "flow.shift": "auto"}, "stable",
                    last_step=20, evals=[(0, 4.2), (10, 3.95), (20, 3.8)]),
        TrialRecord("t2", {"train.learning_rate": 1e3, "train.max_grad_norm": 1.0, "flow.shift": 1.0}, "diverged",
                    "step 3: loss not finite", last_step=3, evals=[(0, 4.2)]),
        TrialRecord("t3", {"train.learning_rate": 1e-4, "train.max_grad_norm": None, "flow.shift": 3.0}, "stopped",
                    "stopped by ASHA at step 10", last_step=10, evals=[(10, 4.1)]),
        TrialRecord("t4", {"train.learning_rate": 1e-3, "train.max_grad_norm": 0.5, "flow.shift": 3.0}, "failed",
                    "RuntimeError: out of memory"),
    ]
    paths = write_report(base, recs, keys, tmp_path, "demo")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [r["trial"] for r in rows] == ["t1", "t0", "t3", "t2", "t4"]  # stable by final eval loss first
    assert rows[0]["best_eval_loss"] == "3.8" and rows[0]["best_step"] == "20"
    assert rows[3]["status"] == "diverged" and rows[3]["note"] == "step 3: loss not finite"
    md = paths["md"].read_text()
    assert "5 trials: 2 stable, 1 stopped, 1 diverged, 1 failed" in md and "| t4 | failed |" in md
    for png in (paths["curves"], paths["map"]):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000
    best = load_job(paths["best"])
    assert best_trial(recs).trial_id == "t1"
    assert best.tune is None and best.train.learning_rate == 3e-2 and best.flow.shift == "auto"
    assert best.output_dir == tmp_path / "best" and Path(best.cache_dir) == tmp_path / "cache"
    assert paths["best"].read_text().startswith("# Best stable trial t1")

    all_diverged = [TrialRecord("x", {}, "diverged", "step 2: nan", last_step=2)]
    assert write_report(base, all_diverged, keys, tmp_path, "demo")["best"] is None
    assert not (tmp_path / "best.yaml").exists()  # a stale best.yaml would point at an older answer


# --- whole studies through the CLI ---------------------------------------------------------------------------------
# One study, small on purpose (2 cores): 16 images, 8 steps, 1 worker per trial, one trial at a time, ASHA with a
# grace period of 4 steps, train.max_failures=0. Every status a study can give is seen once, and every way to go on:
# lr 1e-2 trains to the end; lr 3e-3 is behind it at step 4 and ASHA stops it; the driver is killed then; --resume
# runs the absurd lr 1e3, which diverges, and a fourth trial (lr 1e-2 again: at step 4 it is level with the first,
# so ASHA lets it on) whose Ray Train worker is killed once its step-4 checkpoint is on storage: a failed trial.
# --resume alone keeps it failed and starts no Ray; --resume --retry-failed continues it from that checkpoint. One
# trial at a time keeps ASHA's decisions deterministic (with trials side by side they depend on which reaches a
# rung first).

SMALL = ["data.datasets.0.demo_images=16", "data.eval_samples=4", "train.max_steps=8", "train.eval_every=4",
         "train.checkpoint_every=4", "tune.scheduler.grace_period=4", "tune.max_concurrent_trials=1",
         "tune.trials=[{train.learning_rate: 1.0e-2}, {train.learning_rate: 3.0e-3}, "
         "{train.learning_rate: 1.0e+3}, {train.learning_rate: 1.0e-2}]"]


def tune_cmd(study: Path, tmp: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "raytune_sd3.tune", "jobs/tune-tiny.yaml"]
    for o in [f"output_dir={study}", f"data.datasets.0.instance_data_dir={tmp / 'demo'}", *SMALL]:
        cmd += ["--set", o]
    return cmd + list(extra)


def read_rows(study: Path) -> list[dict]:
    return list(csv.DictReader(open(study / "trials.csv")))


def _session_pids(sid: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                fields = stat[stat.rindex(")") + 2:].split()
                if fields[0] != "Z" and int(fields[3]) == sid:
                    pids.append(int(d.name))
            except (OSError, ValueError, IndexError):
                pass
    return pids


def _end_session(sid: int, timeout: float = 20) -> None:
    """Wait for what the killed driver started (its local Ray, in its session) to exit; kill stragglers."""
    deadline = time.time() + timeout
    while _session_pids(sid) and time.time() < deadline:
        time.sleep(0.5)
    for pid in _session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _trial_statuses(experiment: Path) -> dict[str, str]:
    """Trial id -> status in the study state Tune saved on disk (what --resume will see)."""
    import logging

    from ray.tune import ExperimentAnalysis

    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)  # "no results yet"
    try:
        return {t.trial_id: t.status for t in ExperimentAnalysis(str(experiment)).trials}
    except Exception:  # not written yet, or being replaced
        return {}


def _metrics_lines(text: bytes) -> dict[int, str]:
    return {json.loads(line)["step"]: line for line in text.decode().splitlines() if line.strip()}


def _files(trial: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in trial.rglob("*") if p.is_file()}


def _kill_the_fourth_trial_at_step_4(driver: subprocess.Popen, out: Path, finished: list[str], tag: str) -> tuple:
    """Kill the Ray Train worker of the trial that is neither finished nor the absurd one once its step-4 checkpoint
    is on storage (one trial at a time: the only worker with our tag is its own). Returns (trial, step killed at)."""
    from tests.test_fault import NewestCheckpoint, _our_train_workers  # the step judged from the files alone

    deadline, victim, newest_checkpoint, learning_rates = time.time() + 600, None, None, {}
    while driver.poll() is None and time.time() < deadline:
        # Found once, each trial's job.yaml read once: the poll below must be quick, as the trial takes its next 4
        # steps in well under a second (a poll that also parsed each trial's job.yaml once saw step 8's checkpoint
        # first, on a loaded machine), and cheap, as it shares the 2 cores with the study it watches.
        while victim is None and driver.poll() is None and time.time() < deadline:
            for t in (out / "trials").iterdir():
                if t.name not in finished and t.name not in learning_rates and (t / "job.yaml").is_file():
                    learning_rates[t.name] = load_job(t / "job.yaml").train.learning_rate
            victim = next((out / "trials" / t for t, lr in learning_rates.items() if lr == 1e-2), None)  # not absurd
            time.sleep(0.005)
        if victim is not None and newest_checkpoint is None:
            newest_checkpoint = NewestCheckpoint(victim / "ray" / victim.name)
        newest = newest_checkpoint() if newest_checkpoint is not None else None
        if newest is not None and newest >= 4:
            workers = _our_train_workers(tag)
            assert len(workers) == 1, workers
            os.kill(workers[0], signal.SIGKILL)
            return victim.name, newest
        time.sleep(0.005)
    return None, None


@pytest.fixture(scope="module")
def study(tmp_path_factory, shared_ray) -> dict:
    """The study above on the session's shared Ray (killing the driver ends its Ray job, trials included): run and
    killed after two finished trials; resumed, with the fourth trial's worker killed; resumed again, then with
    --retry-failed. Returns what the tests check: each run's console, and the table and files after each step."""
    tmp = tmp_path_factory.mktemp("tune")
    out = tmp / "study"
    cmd = tune_cmd(out, tmp)
    tag = uuid.uuid4().hex
    env = {**shared_ray, "RAYTUNE_SD3_TEST_TAG": tag}  # the driver passes RAYTUNE_SD3_* on to the trials' workers
    first_log = tmp / "first-driver.log"
    t0 = time.perf_counter()
    with open(first_log, "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                  env=env)
        try:
            deadline, statuses = time.time() + 900, {}
            while time.time() < deadline and driver.poll() is None:
                statuses = _trial_statuses(out / "ray" / "study")
                if list(statuses.values()).count("TERMINATED") >= 2:
                    break
                time.sleep(1)
            assert driver.poll() is None and list(statuses.values()).count("TERMINATED") == 2, (
                statuses, first_log.read_text()[-3000:])
        finally:
            driver.kill()  # SIGKILL: the driver saves nothing more
            driver.wait()
            _end_session(driver.pid)
    assert not (out / "trials.csv").exists()
    finished = sorted(t for t, s in statuses.items() if s == "TERMINATED")
    before = {t: (out / "trials" / t / "metrics.jsonl").stat().st_mtime for t in finished}
    print(f"tiny study, until killed: {time.perf_counter() - t0:.0f}s")

    t0 = time.perf_counter()
    resume_log = tmp / "resume-driver.log"
    with open(resume_log, "w") as log:
        driver = subprocess.Popen(cmd + ["--resume"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True, env=env)
        try:
            victim, killed_at = _kill_the_fourth_trial_at_step_4(driver, out, finished, tag)
            assert victim is not None, resume_log.read_text()[-3000:]
            assert driver.wait(timeout=600) == 0, resume_log.read_text()[-3000:]  # a failed trial is a result
        finally:
            driver.kill()
            driver.wait()
            _end_session(driver.pid)
    print(f"resumed, a trial killed: {time.perf_counter() - t0:.0f}s")
    victim_metrics = out / "trials" / victim / "metrics.jsonl"
    failed = {"rows": read_rows(out), "metrics": victim_metrics.read_bytes(), "files": _files(out / "trials")}

    t0 = time.perf_counter()
    again = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-5000:]
    print(f"--resume: {time.perf_counter() - t0:.0f}s")
    kept = {"rows": read_rows(out), "files": _files(out / "trials")}

    t0 = time.perf_counter()
    retried = subprocess.run(cmd + ["--resume", "--retry-failed"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=600)
    assert retried.returncode == 0, retried.stdout[-3000:] + retried.stderr[-5000:]
    print(f"--resume --retry-failed: {time.perf_counter() - t0:.0f}s")
    return {"tmp": tmp, "out": out, "finished": finished, "before": before, "first_log": first_log.read_text(),
            "resume_log": resume_log.read_text(), "victim": victim, "killed_at": killed_at, "failed": failed,
            "again_log": again.stdout + again.stderr, "kept": kept}


@pytest.mark.slow
def test_study_marks_the_absurd_lr_diverged_and_writes_the_report(study):
    out = study["out"]
    rows = read_rows(out)
    assert len(rows) == 4
    by_lr = {float(r["train.learning_rate"]): r for r in rows if r["trial"] != study["victim"]}
    absurd = by_lr[1000.0]
    assert absurd["status"] == "diverged", absurd  # a result, not a failure
    assert absurd["note"].startswith(f"step {absurd['steps']}:") and int(absurd["steps"]) < 8
    assert by_lr[3e-3]["status"] == "stopped" and by_lr[3e-3]["note"] == "stopped by ASHA at step 4", rows
    stable = by_lr[1e-2]
    assert stable["status"] == "stable" and stable["steps"] == "8" and float(stable["final_eval_loss"]) > 0, rows
    for r in rows:  # stable trials leave their LoRA (the retried one too); stopped and diverged ones do not
        has_lora = (out / r["output_dir"] / "pytorch_lora_weights.safetensors").exists()
        assert has_lora == (r["status"] == "stable")
    md = (out / "trials.md").read_text()
    assert "4 trials: 2 stable, 1 stopped, 1 diverged" in md and all(r["trial"] in md for r in rows)
    for png in ("eval_loss.png", "stability.png"):
        assert (out / png).read_bytes()[:8] == PNG

    best = load_job(out / "best.yaml")
    winner = rows[0]  # the table lists stable trials by final eval loss first
    assert winner["status"] == "stable" and best.tune is None and best.output_dir == out / "best"
    assert best.train.learning_rate == float(winner["train.learning_rate"])
    assert Path(best.cache_dir) == out / "cache"


# What Tune, Ray and other third parties printed on a study's console before it went to ray.log or was silenced.
NOT_OURS = ("Configuration for experiment", "tensorboard --logdir", "View detailed results here",
            "worker processes have been started", "Token authentication", "core_worker", "[transformers]",
            "[WARNING]", "publisher trust", "Writing model shards", "fontManager")


@pytest.mark.slow
def test_a_study_prints_our_lines_only(study):
    """The study's console, killed and resumed: our lines (stages, the report, where the results are), at most 15
    for the resumed run; Tune's configuration box, its TensorBoard hint and the raylet's warnings in ray.log."""
    for console in (study["first_log"], study["resume_log"]):
        assert not [line for line in console.splitlines() if any(m in line for m in NOT_OURS)], console
    assert "study study: 4 trials, 1 at a time" in study["first_log"]
    assert "best job:" in study["resume_log"] and len(study["resume_log"].splitlines()) <= 15, study["resume_log"]


@pytest.mark.slow
def test_killed_study_resumes_without_rerunning_finished_trials(study):
    out = study["out"]
    table = read_rows(out)
    assert {row["trial"] for row in table} == {p.name for p in (out / "trials").iterdir()}
    rows = {float(row["train.learning_rate"]): row for row in table if row["trial"] != study["victim"]}
    assert study["finished"] == [rows[1e-2]["trial"], rows[3e-3]["trial"]]  # the two that ended before the kill
    for t, mtime in study["before"].items():  # the finished trials did not train again
        assert (out / "trials" / t / "metrics.jsonl").stat().st_mtime == mtime


@pytest.mark.slow
def test_study_encodes_the_data_set_once(study):
    out = study["out"]
    assert "cache: 16 items (16 latents encoded, 0 reused" in study["first_log"]
    assert "(the cache is not touched)" in study["resume_log"]  # --resume keeps the cache the trials compared on
    report = json.loads((out / "cache_report.json").read_text())
    assert report["items"] == 16 and report["latents_encoded"] == 16 and report["latents_reused"] == 0
    trials = sorted((out / "trials").iterdir())
    assert len(trials) == 4
    # trials never ran the caching stage: no report or manifest of their own, the study's cache in their job
    assert not any((t / "cache_report.json").exists() or (t / MANIFEST).exists() for t in trials)
    assert all(Path(load_job(t / "job.yaml").cache_dir) == out / "cache" for t in trials)
    # and wrote nothing into the cache: every entry predates the first trial (its job.yaml is its first file)
    first_trial = min((t / "job.yaml").stat().st_mtime for t in trials)
    entries = [p for p in (out / "cache").rglob("*") if p.is_file()]
    assert entries and max(p.stat().st_mtime for p in entries) <= first_trial


@pytest.mark.slow
def test_best_yaml_trains(study, tmp_path, shared_ray):
    best = study["out"] / "best.yaml"
    r = subprocess.run([sys.executable, "-m", "raytune_sd3.train", str(best), "--set", "train.max_steps=2",
                        "--set", f"output_dir={tmp_path / 'best'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env=shared_ray)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").exists()
    report = json.loads((tmp_path / "best" / "cache_report.json").read_text())
    # the study's cache, reused: a later run on a filled cache encodes nothing
    assert (report["latents_encoded"], report["texts_encoded"], report["latents_reused"], report["items"]) == (0, 0, 16, 16)


@pytest.mark.slow
def test_report_only_rewrites_the_report_and_trains_nothing(study, tmp_path):
    """`--report-only` on the finished study: the same table from Tune's saved state, no trial touched. (After
    the tests above: it deletes the report before rewriting it.)"""
    from raytune_sd3.run_layout import STUDY_REPORT as REPORT_FILES

    out = study["out"]
    table, best = (out / "trials.csv").read_text(), load_job(out / "best.yaml")
    winner = (out / "best.yaml").read_text().splitlines()[:2]  # trial, eval loss and settings
    trained = {p: p.stat().st_mtime for p in (out / "trials").rglob("*") if p.is_file()}
    for name in REPORT_FILES:
        (out / name).unlink()
    r = subprocess.run(tune_cmd(out, study["tmp"], "--report-only"), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "trials.csv").read_text() == table
    # The same best.yaml, `auto` settings included: without Ray they come from the study's job.yaml.
    assert (out / "best.yaml").read_text().splitlines()[:2] == winner
    assert load_job(out / "best.yaml") == best
    assert all((out / name).is_file() for name in REPORT_FILES)
    assert {p: p.stat().st_mtime for p in (out / "trials").rglob("*") if p.is_file()} == trained
    r = subprocess.run(tune_cmd(tmp_path / "none", study["tmp"], "--report-only"), cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 2, r.stdout + r.stderr  # no study there


def test_trials_of_a_study_are_one_wandb_group(tmp_path):
    """With wandb.project set, every trial's W&B run is in a group named after the study, named by its trial id."""
    cfg = load_job(ROOT / "jobs" / "tune-tiny.yaml", [f"output_dir={tmp_path / 'lr-study'}", "wandb.project=p",
                                                       "wandb.mode=offline"])
    trial = job_for_params(study_base(cfg), {"train.learning_rate": 1e-3}, tmp_path / "lr-study" / "trials" / "t1")
    assert (trial.wandb.project, trial.wandb.group, trial.wandb.name, trial.run_name) == ("p", "lr-study", None, "t1")
    assert trial.train.learning_rate == 1e-3
    plain = job_for_params(study_base(load_job(ROOT / "jobs" / "tune-tiny.yaml", [f"output_dir={tmp_path}"])), {},
                           tmp_path / "trials" / "t2")
    assert plain.wandb.project is None and plain.wandb.group is None  # no W&B unless configured


@pytest.mark.slow
def test_failed_trial_stays_failed_on_resume_and_reruns_with_retry_failed(study):
    out, victim, killed_at = study["out"], study["victim"], study["killed_at"]
    failed = {r["trial"]: r for r in study["failed"]["rows"]}
    assert failed[victim]["status"] == "failed" and failed[victim]["note"], failed
    assert sorted(r["status"] for r in failed.values()) == ["diverged", "failed", "stable", "stopped"], failed
    assert "--retry-failed" in study["resume_log"]  # the report says how to rerun it
    before_kill = _metrics_lines(study["failed"]["metrics"])
    assert killed_at == 4 and max(before_kill) < 8, "the trial ended before it could be killed"

    # --resume alone: a failed trial is a result of the study as it stands; nothing trains, no Ray starts
    kept = {r["trial"]: r for r in study["kept"]["rows"]}
    assert {t: r["status"] for t, r in kept.items()} == {t: r["status"] for t, r in failed.items()}, kept
    assert "--retry-failed" in study["again_log"]
    assert "nothing to resume" in study["again_log"] and "Ray's own output" not in study["again_log"]
    assert study["kept"]["files"] == study["failed"]["files"]  # no trial's file written or touched

    # --resume --retry-failed: the failed trial continues from its checkpoint to the end; the others are kept
    rows = {r["trial"]: r for r in read_rows(out)}
    # the same trial, in its own folder (Tune's restart_errored would replace it with a new trial from step 0)
    assert set(rows) == set(failed) == {p.name for p in (out / "trials").iterdir()}, rows
    assert rows[victim]["status"] == "stable" and rows[victim]["steps"] == "8", rows
    written = _metrics_lines((out / "trials" / victim / "metrics.jsonl").read_bytes())
    assert sorted(written) == list(range(9))
    assert [written[s] for s in range(killed_at + 1)] == [before_kill[s] for s in range(killed_at + 1)]  # resumed
    assert (out / "trials" / victim / "pytorch_lora_weights.safetensors").exists()
    others = {p: t for p, t in study["failed"]["files"].items() if victim not in p.relative_to(out / "trials").parts}
    assert others and {p: p.stat().st_mtime_ns for p in others} == others  # the other trials untouched
