"""The README's timings: each command of its setups table and recipe that runs on this machine, timed as a user
runs it (the real CLI in a fresh process, a fresh output_dir), with the peak memory of everything it started.

    python benchmarks/first_hour.py          # writes benchmarks/first_hour.json (tests/test_docs.py checks the README)

Peak memory is the largest sum of resident memory over the command's process tree (the CLI, the Ray it starts and
Ray's workers), sampled every 0.2 s. The machine is recorded beside the numbers: they hold for it alone.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("first_hour.json")


def timed(args: list[str]) -> dict:
    """Runs `python -m ARGS` from the repo root; its wall seconds, peak tree RSS (GiB) and exit status."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    return {"command": "python -m " + " ".join(args), "seconds": round(time.perf_counter() - t0, 1),
            "peak_gib": round(peak / 2**30, 1), "exit": proc.returncode}


def main() -> None:
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="first_hour-"))
    demo = ["--set", f"output_dir={tmp / 'tiny'}", "--set", f"data.datasets.0.instance_data_dir={tmp / 'shapes'}"]
    runs = {
        "check the demo": timed(["raytune_sd3.check", "jobs/tiny.yaml", *demo]),
        "train the demo": timed(["raytune_sd3.train", "jobs/tiny.yaml", *demo]),
        "rerun the finished demo": timed(["raytune_sd3.train", "jobs/tiny.yaml", *demo]),
        "tune demo": timed(["raytune_sd3.tune", "jobs/tune-tiny.yaml", "--set", f"output_dir={tmp / 'tune'}",
                            "--set", f"data.datasets.0.instance_data_dir={tmp / 'shapes'}"]),
    }
    shutil.rmtree(tmp, ignore_errors=True)
    machine = (f"{psutil.cpu_count(logical=False) or os.cpu_count()} cores "
               f"({platform.processor() or platform.machine()}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
               f"no GPU" if not shutil.which("nvidia-smi") else "with a GPU")
    load = f"1-min load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
    RESULTS.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": machine, "load": load,
                                   "runs": runs}, indent=1) + "\n")
    print(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
