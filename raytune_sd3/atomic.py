"""Whole or not at all: every file and folder the project writes for a reader (a job file, metrics, a LoRA, a
checkpoint's record, validation images, a test model) goes through here.

A file is written to a temp file in its own folder (so the rename never crosses filesystems), fsynced, then
os.replace'd onto its name: a reader, or a crash mid-write, sees the old file whole or the new one whole, never half.
A folder is written into a temp folder beside it, then renamed into place; an old folder there is swapped out
whole. (The cache's entries on storage that may be a URI go through pyarrow's filesystems: data/files.py.)

Hand-written rather than a library: `atomicwrites` is archived, and none we know also writes folders or lets a
writer that only takes a path (matplotlib, pyarrow, diffusers) write the temp file.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_file(path: Path | str, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` to write a temp file beside `path` (same suffix: writers that read the format from it
    work), fsync it, then os.replace it onto `path`; returns `path`. If `write` raises, `path` is untouched and the
    temp file is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _readable_as_usual(tmp, 0o666)  # mkstemp makes it private; our files are as readable as any other
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # the rename itself survives a power cut
    return path


def write_text(path: Path | str, text: str) -> Path:
    return write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: Path | str, data: bytes) -> Path:
    return write_file(path, lambda tmp: tmp.write_bytes(data))


def copy_file(src: Path | str, dest: Path | str) -> Path:
    """`src`'s bytes as `dest`, atomically; returns `dest`."""
    return write_file(dest, lambda tmp: shutil.copyfile(src, tmp))


def write_folder(path: Path | str, write: Callable[[Path], object], done: str | None = None) -> Path:
    """Call `write(tmp)` to fill a temp folder beside `path`, fsync its files, then rename it to `path`; returns
    `path`. `done`: the file a finished folder holds. A folder already at `path` that holds it was written by a
    concurrent writer that finished first: it is kept and ours discarded. Any other folder at `path` (an old copy,
    or an unfinished one without `done`) is replaced whole. If `write` raises, `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        _readable_as_usual(tmp, 0o777)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
        try:
            os.replace(tmp, path)  # atomic; also over an empty folder
        except OSError:
            if done is not None and (path / done).exists():
                return path  # another writer finished first: keep its copy (ours goes in `finally`)
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)  # a non-empty folder cannot be replaced in one rename: swap it out, then in
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        _fsync(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _read_umask() -> int:
    umask = os.umask(0o022)  # reading it means setting it: done once, at import, not while other threads write
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _readable_as_usual(path: Path, mode: int) -> None:
    os.chmod(path, mode & ~_UMASK)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
