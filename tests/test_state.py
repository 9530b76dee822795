"""Checkpoint completeness (train/state.py): a checkpoint on storage counts only when checkpoint.json is there and
every file it lists is there at its size, and a restart picks the newest such one. The oracle is what each test did
to the folder (a file cut short, one missing, a record half written), not our reader."""

import json
from pathlib import Path

import pytest

from raytune_sd3.train.state import RECORD, file_sizes, newest_on_storage, read_record, write_record

# What a 2-rank ZeRO checkpoint holds (names as train/state.py writes them), with distinct sizes.
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
