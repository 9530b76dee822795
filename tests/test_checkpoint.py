"""Checkpoint completeness and the resume point (train/checkpoint.py): a checkpoint on storage counts only when
checkpoint.json is there and every file it lists is there at its size, and a restart picks the newest such one over
an older one Ray Train registered. The oracle is what each test did to the folder (a file cut short, one missing, a
record half written), not our reader."""

import json
from pathlib import Path

import pytest

from raytune_sd3.run_layout import CHECKPOINT_RECORD as RECORD
from raytune_sd3.train.checkpoint import (
    choose_resume_point,
    file_sizes,
    newest_on_storage,
    read_record,
    write_record,
)

# What a 2-rank ZeRO checkpoint holds (names as train/checkpoint.py writes them), with distinct sizes.
FILES = {"pytorch_lora_weights.safetensors": 300, "lora_raw.safetensors": 310, "train_state.pt": 120,
         "optimizer_rank0.pt": 500, "optimizer_rank1.pt": 501}


def _checkpoint(run_dir: Path, index: int, step: int) -> Path:
    """A checkpoint folder as Ray Train uploads it: every rank's files, then rank 0's record of them."""
    folder = run_dir / f"checkpoint_{index:06d}"
    folder.mkdir(parents=True)
    for name, size in FILES.items():
        (folder / name).write_bytes(bytes([step % 256]) * size)
    write_record(folder, step, file_sizes(folder))
    return folder


def test_the_record_lists_every_file_with_its_size(tmp_path):
    folder = _checkpoint(tmp_path, 3, step=12)
    assert json.loads((folder / RECORD).read_text()) == {"step": 12, "files": FILES}
    assert sorted(p.name for p in folder.iterdir()) == sorted([*FILES, RECORD])  # no temporary file left
    assert read_record(folder) == {"step": 12, "files": FILES}


@pytest.mark.parametrize("damage", ["cut_short", "grown", "missing", "no_record", "half_written_record",
                                    "record_without_files"])
def test_a_checkpoint_with_any_file_not_whole_is_incomplete(tmp_path, damage):
    folder = _checkpoint(tmp_path, 1, step=4)
    rank1 = folder / "optimizer_rank1.pt"  # another rank's file: rank 0 only knows its size from the record
    if damage == "cut_short":  # an upload caught mid-copy
        rank1.write_bytes(rank1.read_bytes()[:-1])
    elif damage == "grown":
        rank1.write_bytes(rank1.read_bytes() + b"\0")
    elif damage == "missing":
        rank1.unlink()
    elif damage == "no_record":
        (folder / RECORD).unlink()
    elif damage == "half_written_record":
        text = (folder / RECORD).read_text()
        (folder / RECORD).write_text(text[: len(text) // 2])
    else:
        (folder / RECORD).write_text(json.dumps({"step": 4}))
    assert read_record(folder) is None


def test_an_extra_file_does_not_make_a_checkpoint_incomplete(tmp_path):
    folder = _checkpoint(tmp_path, 1, step=4)
    (folder / ".metadata.pkl").write_bytes(b"what Ray Train adds")
    assert read_record(folder)["step"] == 4


def test_a_restart_takes_the_newest_complete_checkpoint(tmp_path):
    """Steps 4, 8 and 12 on storage, 12 caught mid-upload: the restart takes 8; once 12 is whole, 12. The step is
    the record's, not read from the folder's name."""
    assert newest_on_storage(tmp_path) is None
    _checkpoint(tmp_path, 2, step=4)
    eight = _checkpoint(tmp_path, 1, step=8)
    twelve = _checkpoint(tmp_path, 0, step=12)
    lora = twelve / "lora_raw.safetensors"
    whole = lora.read_bytes()
    lora.write_bytes(whole[:100])
    (tmp_path / "checkpoint_000009").mkdir()  # an upload that has not written its record yet
    assert newest_on_storage(tmp_path) == (8, eight)
    lora.write_bytes(whole)
    assert newest_on_storage(tmp_path) == (12, twelve)


def test_the_resume_point_is_the_newest_whole_checkpoint_registered_or_not(tmp_path):
    """What a restarted rank 0 resumes from: nothing on a first start; Ray Train's registered checkpoint while
    storage holds nothing newer and whole; a newer whole one on storage (written just before the worker was lost,
    not yet registered) over it; never one with a file cut short."""
    run_dir = tmp_path / "ray" / "run"
    assert choose_resume_point(None, None) == (None, "")
    assert choose_resume_point(run_dir, None) == (None, "")  # the folder not made yet
    four = _checkpoint(run_dir, 0, step=4)
    point, line = choose_resume_point(run_dir, four)
    assert (point.folder, point.step, point.registered) == (four, 4, True)
    assert line == "resuming from step 4 (Ray Train's checkpoint checkpoint_000000)"

    eight = _checkpoint(run_dir, 1, step=8)
    point, line = choose_resume_point(run_dir, four)
    assert (point.folder, point.step, point.registered) == (eight, 8, False)
    assert line == ("resuming from step 8 (checkpoint_000001), the newest complete checkpoint on storage "
                    "(Ray Train had registered step 4)")
    point, line = choose_resume_point(run_dir, None)  # a restart that Ray Train gives no checkpoint
    assert (point.folder, point.step) == (eight, 8) and line.endswith("(Ray Train had registered none)")

    raw = eight / "lora_raw.safetensors"
    raw.write_bytes(raw.read_bytes()[:-1])  # caught mid-upload: the registered one it is
    assert choose_resume_point(run_dir, four)[0].folder == four
    raw.unlink()
    assert choose_resume_point(run_dir, None)[0].folder == four  # missing: the newest whole one, unregistered


def test_a_registered_checkpoint_as_new_as_storage_is_resumed_from_as_registered(tmp_path):
    """Ray Train's copy wins a tie (it may live on other storage: resumed from through as_directory())."""
    run_dir = tmp_path / "run"
    eight = _checkpoint(run_dir, 1, step=8)
    registered = _checkpoint(tmp_path / "elsewhere", 1, step=8)
    point, _ = choose_resume_point(run_dir, registered)
    assert (point.folder, point.registered) == (registered, True)
    assert choose_resume_point(run_dir, eight)[0].registered
