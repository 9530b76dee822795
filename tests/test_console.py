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


ROUTED = """
import logging, os, sys, warnings
from pathlib import Path
from raytune_sd3.driver import console

console.setup_logging(verbose={verbose})
logging.getLogger("raytune_sd3").info("ours before")
logging.getLogger("kernels.hub").warning("third party before ray.log")
deepspeed = logging.getLogger("DeepSpeed")  # as DeepSpeed sets up its logger on import: its own handler
deepspeed.propagate = False
deepspeed.addHandler(logging.StreamHandler(sys.stdout))
deepspeed.warning("accelerator guess")
warnings.warn("a library's UserWarning")
if not {verbose}:
    console.ray_log_to_file(Path(sys.argv[1]))
logging.getLogger("ray._private.worker").warning("raylet chatter")
os.write(2, b"native line\\n")
logging.getLogger("raytune_sd3.driver").info("ours after")
print("error: ours printed", file=sys.stderr)
"""


def _run_routed(tmp_path, verbose: bool):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", ROUTED.format(verbose=verbose), str(tmp_path)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout + r.stderr


def test_third_parties_go_to_ray_log_and_ours_stay(tmp_path):
    """Without --verbose the console keeps our lines only; a third party's records from before ray.log existed,
    a logger with its own handler, Ray's loggers (whose handlers ray.init clears) and native stderr land in it."""
    console_text = _run_routed(tmp_path, verbose=False)
    assert [line.split(" ", 1)[-1] for line in console_text.splitlines()] == [
        "ours before", "ours after", "ours printed"], console_text
    ray_log = (tmp_path / "ray.log").read_text()
    for line in ("kernels.hub WARNING: third party before ray.log", "DeepSpeed WARNING: accelerator guess",
                 "py.warnings WARNING: ", "UserWarning: a library's UserWarning",
                 "ray._private.worker WARNING: raylet chatter", "native line"):
        assert line in ray_log, ray_log
    assert "ours" not in ray_log


def test_verbose_keeps_everything_on_the_console(tmp_path):
    console_text = _run_routed(tmp_path, verbose=True)
    for line in ("ours before", "third party before ray.log", "accelerator guess", "a library's UserWarning",
                 "raylet chatter", "native line"):
        assert line in console_text, console_text
