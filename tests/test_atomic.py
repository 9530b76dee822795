"""One atomic write (raytune_sd3/atomic.py): a crash mid-write leaves the old file or folder whole; a finished write
replaces it whole, readable as any other file; no temp file is left behind."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from raytune_sd3 import atomic

OLD, NEW = b"old record\n" * 100, b"new record\n" * 200


def _half_then(fail):
    """A writer that writes half the new bytes, then fails as `fail` says."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(NEW[: len(NEW) // 2])
            f.flush()
            fail()
    return write


def _boom():
    raise RuntimeError("disk full")


def test_a_writer_that_fails_half_way_leaves_the_old_file_whole(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(OLD)
    with pytest.raises(RuntimeError, match="disk full"):
        atomic.write_file(path, _half_then(_boom))
    assert path.read_bytes() == OLD
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # the temp file went with the failure


def test_a_process_killed_mid_write_leaves_the_old_file_whole(tmp_path):
    """No `except` runs when the process dies: the file keeps its old bytes (only a hidden temp file is left)."""
    path = tmp_path / "job.yaml"
    path.write_bytes(OLD)
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from raytune_sd3 import atomic
        def write(tmp):
            with open(tmp, "wb") as f:
                f.write({NEW!r}[:100])
                f.flush()
                os._exit(9)
        atomic.write_file(Path({str(path)!r}), write)
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 9, r.stderr
    assert path.read_bytes() == OLD
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["job.yaml"]


def test_a_finished_write_replaces_the_file_readable_as_usual(tmp_path):
    path = tmp_path / "sub" / "curves.png"
    seen = []
    atomic.write_file(path, lambda tmp: (seen.append(tmp), tmp.write_bytes(NEW)))
    assert path.read_bytes() == NEW
    assert seen[0].parent == path.parent and seen[0].suffix == ".png"  # same folder; matplotlib reads the suffix
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's private 0600
    atomic.write_text(path, "again")
    atomic.copy_file(path, tmp_path / "copy.png")
    assert (tmp_path / "copy.png").read_text() == "again"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["copy.png", "curves.png", "sub"]


def _fill(files: dict[str, bytes], fail_after: int | None = None):
    def write(tmp: Path) -> None:
        for i, (name, data) in enumerate(files.items()):
            if i == fail_after:
                raise RuntimeError("killed")
            (tmp / name).write_bytes(data)
    return write


def test_a_folder_written_half_way_leaves_the_old_one_whole(tmp_path):
    path = tmp_path / "images"
    atomic.write_folder(path, _fill({"a.png": OLD, "b.png": OLD}))
    with pytest.raises(RuntimeError, match="killed"):
        atomic.write_folder(path, _fill({"c.png": NEW, "d.png": NEW}, fail_after=1))
    assert {p.name: p.read_bytes() for p in path.iterdir()} == {"a.png": OLD, "b.png": OLD}
    atomic.write_folder(path, _fill({"c.png": NEW}))  # a finished one replaces the old folder whole
    assert {p.name: p.read_bytes() for p in path.iterdir()} == {"c.png": NEW}
    assert os.listdir(tmp_path) == ["images"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o777 & ~umask


def test_a_folder_a_concurrent_writer_finished_is_kept(tmp_path):
    path = tmp_path / "demo"
    atomic.write_folder(path, _fill({"0.png": OLD, ".complete": b"1"}), done=".complete")
    atomic.write_folder(path, _fill({"0.png": NEW, ".complete": b"1"}), done=".complete")
    assert (path / "0.png").read_bytes() == OLD
    (path / ".complete").unlink()  # an unfinished folder in the way is replaced
    atomic.write_folder(path, _fill({"0.png": NEW, ".complete": b"1"}), done=".complete")
    assert (path / "0.png").read_bytes() == NEW and os.listdir(tmp_path) == ["demo"]
