"""The training bar follows metrics.jsonl as the loop appends to it, reads only what is new, waits for a line being
written, and starts over when a resumed run rewrites the file shorter."""

import json

from raytune_sd3.driver.console import TrainingProgress


def _line(step: int, **more) -> str:
    return json.dumps({"step": step, "loss": 1.0 / step, "lr": 1e-4, "images_per_s": 8.0, **more}) + "\n"


def test_the_bar_follows_appends_and_a_resume(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(json.dumps({"step": 0, "eval_loss": 2.0}) + "\n" + _line(1) + _line(2))
    progress = TrainingProgress(tmp_path, max_steps=10)
    progress.tick()
    assert progress.bar.n == 2 and progress.bar.fields["loss"] == "0.5"
    offset = progress._offset
    with open(metrics, "a") as f:
        f.write(_line(3) + _line(4)[:-5])  # step 4 half written
    progress.tick()
    assert progress.bar.n == 3 and progress._offset == offset + len(_line(3))  # only the new, complete line
    with open(metrics, "a") as f:
        f.write(_line(4)[-5:])
    progress.tick()
    assert progress.bar.n == 4
    metrics.write_text(json.dumps({"step": 0, "eval_loss": 2.0}) + "\n" + _line(1) + _line(2))  # resumed from 2
    progress.tick(final=True)
    assert progress.bar.n == 2
