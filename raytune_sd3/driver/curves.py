"""curves.png, written into output_dir after a training run: the loss curve (training loss per step, eval loss
where measured) and, beside it, the validation CLIP score (validation.clip_score) over the steps it was measured.

Drawn from metrics.jsonl, so it shows exactly what the log holds; a run without CLIP scores gets the loss alone.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from raytune_sd3 import atomic


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records (a line cut short by a kill is skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_training_curves(metrics: Path, path: Path) -> Path | None:
    """Write the curves of `metrics` (metrics.jsonl) to `path` (atomically); None when it holds no loss yet."""
    records = read_metrics(metrics)
    loss, evals, clip = (_series(records, k) for k in ("loss", "eval_loss", "clip_score"))
    if not loss[0] and not evals[0]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if clip[0] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False, sharex=True)  # one step axis
    ax = axes[0][0]
    ax.plot(*loss, color="tab:blue", linewidth=0.8, alpha=0.8, label="training loss")
    if evals[0]:
        ax.plot(*evals, color="tab:red", marker="o", label="eval loss (fixed sigmas and noise, held-out items)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if clip[0]:
        ax = axes[0][1]
        ax.plot(*clip, color="tab:green", marker="o")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("CLIP score (100 x cosine, mean over the validation images)")
        ax.set_title("Validation CLIP score")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return atomic.write_file(path, lambda tmp: fig.savefig(tmp, dpi=100))
    finally:
        plt.close(fig)
