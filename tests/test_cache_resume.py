"""A cache you can trust: a caching run killed mid-way resumes without re-encoding what it finished and leaves no
corrupt entry; a truncated entry is encoded again; --verify finds an entry whose bytes changed and removes it."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raytune_sd3.data.store import CacheStore

ROOT = Path(__file__).resolve().parents[1]
IMAGES = 32


def _cmd(tmp: Path, *extra: str) -> list[str]:
    sets = [f"output_dir={tmp / 'out'}", f"data.datasets.0.instance_data_dir={tmp / 'demo'}",
            f"data.datasets.0.demo_images={IMAGES}", "data.encode_batch_size=4", "data.encode_actors=1",
            "validation.prompts=[]"]
    return [sys.executable, "-m", "raytune_sd3.cache", "jobs/tiny.yaml", *extra] + [
        a for s in sets for a in ("--set", s)]


def _run(tmp: Path, *extra: str, expect: int = 0, env: dict | None = None) -> tuple[dict, str]:
    r = subprocess.run(_cmd(tmp, *extra), cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == expect, r.stdout[-2000:] + r.stderr[-3000:]
    report = tmp / "out" / "cache_report.json"
    return (json.loads(report.read_text()) if not extra else json.loads(r.stdout[r.stdout.index("{"):])), r.stderr


@pytest.mark.slow
def test_killed_caching_resumes_and_bad_entries_are_found(tmp_path, shared_ray):
    latents = tmp_path / "out" / "cache" / "latents"
    # Its own session: killing the group takes the local Ray it started down with it, as a lost machine would.
    proc = subprocess.Popen(_cmd(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list(latents.glob("*/*.safetensors"))) >= 6:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    time.sleep(2)  # let the killed encoder actor's last write land, if it was mid-way
    store = CacheStore(tmp_path / "out" / "cache")
    done = [key for kind, key in store.entries() if kind == "latents"]
    assert 6 <= len(done) < IMAGES, "the run ended before it could be killed mid-way"
    assert all(store.verify("latents", key) is None for key in done)  # atomic writes: no half entry

    # Before resuming, two finished entries go bad. One keeps its length with a byte changed: only a checksum can
    # tell, so --verify (which starts no Ray) finds and removes it. The other is cut short: every run's cheap check
    # counts it as missing, so the resumed run encodes it again with the ones the kill left undone.
    truncated, flipped = (store.path("latents", key) for key in done[:2])
    data = bytearray(flipped.read_bytes())
    data[-1] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert store.has("latents", flipped.stem)
    verified, stderr = _run(tmp_path, "--verify", expect=1)
    assert verified["removed"] == 1 and verified["good"] == verified["entries"] - 1
    assert f"latents/{flipped.stem}: checksum mismatch" in stderr
    truncated.write_bytes(truncated.read_bytes()[:-100])
    assert not store.has("latents", truncated.stem)

    report, _ = _run(tmp_path, env=shared_ray)  # the resumed run joins the session's Ray
    assert (report["latents_encoded"], report["latents_reused"]) == (IMAGES - len(done) + 2, len(done) - 2)
    verified, _ = _run(tmp_path, "--verify")
    assert verified["removed"] == 0 and verified["good"] == verified["entries"]
