"""What a study leaves for its user: trials.csv / trials.md, eval-loss curves, a stability map and best.yaml.

Each trial ends in one of: `stable` (trained to max_steps), `diverged` (the loop stopped it: non-finite loss or
gradient, eval loss above train.divergence_factor x its start, or gradient norm above train.grad_norm_limit),
`stopped` (ASHA stopped it early for a worse eval loss), `failed` (an error) or `unfinished` (the study was
interrupted: `--resume` continues it). Nothing here imports Ray: it works from plain records.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytune_sd3.config import JobConfig, dump_job
from raytune_sd3.run_layout import (
    STUDY_BEST,
    STUDY_BEST_RUN,
    STUDY_CURVES,
    STUDY_MAP,
    STUDY_TABLE_CSV,
    STUDY_TABLE_MD,
    RunLayout,
)
from raytune_sd3.tune.config import get_key, job_for_params

STATUSES = ("stable", "stopped", "diverged", "failed", "unfinished")
STYLE = {"stable": ("tab:green", "o"), "stopped": ("tab:orange", "v"), "diverged": ("tab:red", "X"),
         "failed": ("black", "s"), "unfinished": ("tab:gray", "P")}
MAP_AXES = ("train.learning_rate", "train.max_grad_norm", "flow.shift")  # x, y, one panel per value


@dataclass
class TrialRecord:
    """One trial as the report sees it."""

    trial_id: str
    params: dict[str, Any]
    status: str
    note: str = ""
    last_step: int | None = None
    evals: list[tuple[int, float]] = field(default_factory=list)
    """(step, eval loss) in step order; step 0 is the eval loss before training where known."""
    output_dir: str = ""
    final_checkpoint: str | None = None
    """The Train checkpoint of its last step (where its LoRA is), when that step saved one."""

    @property
    def best_eval(self) -> tuple[int, float] | None:
        """(step, value) of the lowest eval loss after training started."""
        trained = [e for e in self.evals if e[0] > 0]
        return min(trained, key=lambda e: e[1]) if trained else None

    @property
    def final_eval(self) -> tuple[int, float] | None:
        """(step, value) of the last eval loss measured after training started."""
        trained = [e for e in self.evals if e[0] > 0]
        return trained[-1] if trained else None


def _num(x: Any) -> float | None:
    """A finite-or-infinite float, or None for missing/NaN (how a results table marks 'not reported')."""
    if x is None or isinstance(x, str):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def trial_record(trial_id: str, params: dict[str, Any], tune_status: str, results: list[dict], error: str,
                 max_steps: int, output_dir: str = "", initial_eval: float | None = None) -> TrialRecord:
    """Classify a trial from Tune's status (TERMINATED/ERROR/...) and the metrics it reported, one dict per report.

    A resumed trial may report a step twice (Train resumes from its last checkpoint): the later report wins.
    """
    by_step: dict[int, dict] = {}
    for r in results:
        step = _num(r.get("step"))
        if step is not None:
            by_step[int(step)] = r
    steps = sorted(by_step)
    evals = [(0, initial_eval)] if initial_eval is not None and math.isfinite(initial_eval) else []
    for s in steps:
        v = _num(by_step[s].get("eval_loss"))
        if v is not None and math.isfinite(v):
            evals.append((s, v))
    last_step = steps[-1] if steps else None
    last = by_step[last_step] if steps else {}

    if tune_status == "ERROR":
        status, note = "failed", error or "error (see the Tune trial log)"
    elif _num(last.get("diverged")):
        status, note = "diverged", f"step {last_step}: {last.get('diverged_reason', 'diverged')}"
    elif tune_status != "TERMINATED":
        status, note = "unfinished", f"{tune_status.lower()} when the study stopped; --resume continues it"
    elif last_step is None:
        status, note = "failed", "ended without reporting a step"
    elif last_step >= max_steps:
        status, note = "stable", ""
    else:
        status, note = "stopped", f"stopped by ASHA at step {last_step}"
    checkpoint = last.get("checkpoint_path")  # set by TuneReportCallback on reports that carry a checkpoint
    checkpoint = checkpoint if isinstance(checkpoint, str) and checkpoint else None
    return TrialRecord(trial_id, params, status, note, last_step, evals, output_dir, checkpoint)


def read_initial_eval(output_dir: Path | str) -> float | None:
    """The eval loss before training (the step-0 line of a trial's metrics.jsonl), if it was written."""
    path = RunLayout(output_dir).metrics
    if not path.exists():
        return None
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("step") == 0 and "eval_loss" in rec:
                return float(rec["eval_loss"])
    return None


def ranked(records: list[TrialRecord]) -> list[TrialRecord]:
    """Stable trials by final eval loss (what a full run with those settings ends at), then the others by status."""
    def key(r: TrialRecord):
        final = r.final_eval
        return (STATUSES.index(r.status), final[1] if final else math.inf, r.trial_id)
    return sorted(records, key=key)


def best_trial(records: list[TrialRecord]) -> TrialRecord | None:
    stable = [r for r in ranked(records) if r.status == "stable" and r.final_eval]
    return stable[0] if stable else None


# --- table -------------------------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def table_rows(records: list[TrialRecord], keys: list[str], study_dir: Path) -> list[dict[str, Any]]:
    rows = []
    for r in ranked(records):
        best, final = r.best_eval, r.final_eval
        out = Path(r.output_dir)
        rows.append({"trial": r.trial_id, "status": r.status, **{k: r.params.get(k) for k in keys},
                     "final_eval_loss": final[1] if final else None, "best_eval_loss": best[1] if best else None,
                     "best_step": best[0] if best else None, "steps": r.last_step, "note": r.note,
                     "output_dir": str(out.relative_to(study_dir)) if out.is_relative_to(study_dir) else str(out)})
    return rows


def write_tables(records: list[TrialRecord], keys: list[str], study_dir: Path, title: str) -> tuple[Path, Path]:
    rows = table_rows(records, keys, study_dir)
    columns = ["trial", "status", *keys, "final_eval_loss", "best_eval_loss", "best_step", "steps", "note",
               "output_dir"]
    csv_path, md_path = study_dir / STUDY_TABLE_CSV, study_dir / STUDY_TABLE_MD
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    lines = [f"# {title}", "", summary(records), ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row[c]).replace("|", "\\|") for c in columns) + " |")
    lines += ["", "Files: `eval_loss.png` (eval loss per trial), `stability.png` (status over learning rate x "
              "max_grad_norm, one panel per flow shift), `best.yaml` (the best stable trial as a job)."]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def summary(records: list[TrialRecord]) -> str:
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    text = f"{len(records)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    best = best_trial(records)
    if best:
        text += (f". Best: {best.trial_id} (final eval loss {best.final_eval[1]:.4g}; "
                 + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()) + ")")
    else:
        text += ". No stable trial: lower the learning rate or max_grad_norm range."
    return text


# --- plots -------------------------------------------------------------------------------------------------------

def _label(r: TrialRecord) -> str:
    return f"{r.trial_id} " + " ".join(f"{k.split('.')[-1]}={_fmt(v)}" for k, v in r.params.items())


def plot_eval_curves(records: list[TrialRecord], path: Path) -> Path:
    """Eval loss over steps, one line per trial (colour: trial; line: status); a marker where a trial ended early."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = {"stable": "-", "stopped": ":", "diverged": "--", "failed": "-.", "unfinished": ":"}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    curves = [r for r in ranked(records) if r.evals]
    colors = plt.get_cmap("tab10" if len(curves) <= 10 else "viridis")
    for i, r in enumerate(curves):
        color = colors(i if len(curves) <= 10 else i / max(1, len(curves) - 1))
        steps, values = zip(*r.evals, strict=True)
        ax.plot(steps, values, color=color, marker=".", linestyle=lines[r.status], alpha=0.9,
                label=f"{r.status}: {_label(r)}")
        if r.status != "stable" and r.last_step is not None:  # where it ended, at its last known eval loss
            ax.plot(r.last_step, values[-1], color=color, marker=STYLE[r.status][1], markersize=11,
                    markeredgecolor="k")
    values = [v for r in curves for _, v in r.evals]
    if values and min(values) > 0 and max(values) / min(values) > 20:  # a diverging curve would flatten the rest
        ax.set_yscale("log")
    if not curves:
        ax.text(0.5, 0.5, "no eval loss recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("eval loss (fixed sigmas and noise, held-out items)")
    ax.set_title("Eval loss per trial (X: diverged, v: stopped by ASHA)")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _positions(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Numeric positive values stay (log axis); anything else becomes categories (None -> 'none')."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in values):
        return [float(v) for v in values], None
    cats = sorted({_fmt(v) or "none" for v in values}, key=lambda c: (not c.replace(".", "").isdigit(), c))
    return [float(cats.index(_fmt(v) or "none")) for v in values], cats


def plot_stability_map(records: list[TrialRecord], base: dict, path: Path) -> Path:
    """Status of each trial over learning rate x max_grad_norm, one panel per flow shift."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xk, yk, pk = MAP_AXES
    def value(r: TrialRecord, k: str) -> Any:
        return r.params[k] if k in r.params else get_key(base, k)

    panels = sorted({_fmt(value(r, pk)) for r in records}, key=str) or [_fmt(get_key(base, pk))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4.5), squeeze=False, sharex=True,
                             sharey=True)
    best = best_trial(records)
    xs, x_cats = _positions([value(r, xk) for r in records] or [1.0])
    ys, y_cats = _positions([value(r, yk) for r in records] or [1.0])
    for ax, panel in zip(axes[0], panels, strict=True):
        for i, r in enumerate(records):
            if _fmt(value(r, pk)) != panel:
                continue
            color, marker = STYLE[r.status]
            ax.scatter(xs[i], ys[i], c=color, marker=marker, s=90, edgecolors="k" if r is best else "none",
                       linewidths=2, zorder=3)
            final = r.final_eval
            if r.status in ("stable", "stopped") and final:
                ax.annotate(f"{final[1]:.3g}", (xs[i], ys[i]), textcoords="offset points", xytext=(6, 6),
                            fontsize=7)
        ax.set_title(f"flow.shift = {panel}")
        ax.set_xlabel(xk)
        for axis, cats, set_scale in ((ax.xaxis, x_cats, ax.set_xscale), (ax.yaxis, y_cats, ax.set_yscale)):
            if cats is None:
                set_scale("log")
            else:
                axis.set_ticks(range(len(cats)), cats)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(yk)
    handles = [plt.Line2D([], [], color=STYLE[s][0], marker=STYLE[s][1], linestyle="", markersize=9, label=s)
               for s in STATUSES if any(r.status == s for r in records)]
    if handles:
        fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle("Stability map (numbers: final eval loss; outlined: best)")
    fig.tight_layout(rect=(0, 0, 0.9, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- best.yaml ---------------------------------------------------------------------------------------------------

def write_best_job(base: dict, best: TrialRecord, study_dir: Path, study_name: str) -> Path:
    """The best trial's settings as a job for `python -m raytune_sd3.train`: no tune section, its own output_dir,
    the study's cache (nothing is re-encoded)."""
    job: JobConfig = job_for_params(base, best.params, study_dir / STUDY_BEST_RUN)
    path = study_dir / STUDY_BEST
    step, value = best.final_eval
    header = [f"# Best stable trial {best.trial_id} of study {study_name}: eval loss {value:.4g} at step {step}.",
              "# Settings: " + ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items()),
              f"# Run:  python -m raytune_sd3.train {path}"]
    path.write_text("\n".join(header) + "\n" + dump_job(job))
    return path


def write_report(base: dict, records: list[TrialRecord], keys: list[str], study_dir: Path,
                 study_name: str) -> dict[str, Path | None]:
    """Every report file of a study; `best` is None when no trial was stable (and a stale best.yaml is removed)."""
    study_dir = Path(study_dir)
    csv_path, md_path = write_tables(records, keys, study_dir, f"Study {study_name}")
    paths: dict[str, Path | None] = {"csv": csv_path, "md": md_path,
                                     "curves": plot_eval_curves(records, study_dir / STUDY_CURVES),
                                     "map": plot_stability_map(records, base, study_dir / STUDY_MAP)}
    best = best_trial(records)
    if best:
        paths["best"] = write_best_job(base, best, study_dir, study_name)
    else:
        (study_dir / STUDY_BEST).unlink(missing_ok=True)
        paths["best"] = None
    return paths
