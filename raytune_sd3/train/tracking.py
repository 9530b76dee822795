"""Weights & Biases: the run's metrics and validation images, from rank 0, when `wandb.project` is set.

metrics.jsonl and the PNGs in output_dir are always written; W&B is a view on the same numbers. One W&B run per
job, resumed (same id, kept in output_dir) when Ray Train restarts the workers or the job is rerun, so a fault
leaves one unbroken chart. Offline mode writes under output_dir/wandb for `wandb sync` later.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from raytune_sd3 import atomic
from raytune_sd3.config import JobConfig, redact
from raytune_sd3.run_layout import RunLayout


def _run_id(out_dir: Path) -> str:
    """This output_dir's W&B run id: made once, then read back by every restart of the run."""
    path = RunLayout(out_dir).wandb_run_id
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    atomic.write_text(path, run_id)
    return run_id


def credentials_problem(cfg: JobConfig) -> str | None:
    """Why an online W&B run would fail to log in (checked before Ray starts), or None."""
    w = cfg.wandb
    if w.project is None or w.mode != "online" or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return None
    if os.environ.get("WANDB_API_KEY"):
        return None
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="replace"):
        return None
    return ("wandb.project is set with wandb.mode online, but there is no W&B key here: set WANDB_API_KEY in the "
            "environment of every node (or run `wandb login`), or use wandb.mode: offline and `wandb sync` later")


class Tracker:
    """No-op unless this is the logging rank and W&B is configured."""

    def __init__(self, cfg: JobConfig, active: bool):
        self.run = None
        w = cfg.wandb
        if not active or w.project is None:
            return
        import wandb

        out = Path(cfg.output_dir)
        self.send_images = w.log_images
        self.run = wandb.init(
            project=w.project, entity=w.entity, group=w.group, name=w.name or cfg.run_name, tags=w.tags or None,
            mode=w.mode, dir=str(out), id=_run_id(out), resume="allow",
            config=redact(cfg.model_dump(mode="json", exclude={"tune"})),
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log(self, metrics: dict) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def log_images(self, folder: Path, step: int, prompts: list[str]) -> None:
        """The validation PNGs of one step (NN_WxH.png: prompt NN at WxH), captioned with their prompts."""
        if self.run is None or not self.send_images or not folder.is_dir():
            return
        import wandb

        def caption(png: Path) -> str:
            index, _, size = png.stem.partition("_")
            return f"{prompts[int(index)]} ({size})" if index.isdigit() and int(index) < len(prompts) else png.stem

        images = [wandb.Image(str(p), caption=caption(p)) for p in sorted(folder.glob("*.png"))]
        if images:
            self.run.log({"validation": images}, step=step)

    def log_clip_scores(self, scores: dict[int, float], step: int) -> None:
        """Each validation prompt's CLIP score, as clip_score/NN (NN: the prompt's index in validation.prompts)."""
        if self.run is not None and scores:
            self.run.log({f"clip_score/{i:02d}": s for i, s in scores.items()}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
