"""Finding the images of a data set and their captions; what cannot be used is listed with the reason, not fatal.

Caption sources (caption_strategy): a .txt beside each image (several lines = several captions, one drawn per
epoch), the file name, one instance prompt, or a metadata file (JSONL, CSV or parquet: file name -> caption or
list of captions).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from raytune_sd3.config import DatasetConfig
from raytune_sd3.data.buckets import sizings_of

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
PATH_COLUMNS = ("file_name", "path", "image", "filename")
CAPTION_COLUMNS = ("caption", "captions", "text", "prompt")


@dataclass(frozen=True)
class Item:
    """One training image: where it is, its caption(s) and how it is to be sized."""

    path: str
    caption: str
    dataset_id: str
    sizing: str
    """The JSON of its data set's `Sizing` at one resolution (a multi-resolution image is one Item per size)."""
    more_captions: tuple[str, ...] = ()
    """Alternatives to `caption`: the reader draws one of all of them per epoch."""
    mask_path: str = ""
    """The loss mask beside the image (masked loss), or ""."""
    regularisation: bool = False
    repeats: int = 0

    @property
    def captions(self) -> list[str]:
        return [self.caption, *self.more_captions]

    def to_row(self) -> dict:
        """What the Ray Data stages carry (the alternatives stay on the driver)."""
        return {"path": self.path, "caption": self.caption, "dataset_id": self.dataset_id, "sizing": self.sizing,
                "mask_path": self.mask_path}


class CaptionError(ValueError):
    """A caption that cannot be used; the message says why and what to do."""


def read_caption_file(txt: Path) -> list[str]:
    """A caption file's captions, one per non-empty line (UTF-8, a BOM allowed); CaptionError when there is none
    or the file is not UTF-8."""
    try:
        text = txt.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionError(f"caption file {txt.name} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise CaptionError(f"caption file {txt.name} is empty; write a caption or delete it to use the file name")
    return captions


def _column(names: list[str], wanted: tuple[str, ...], source: Path) -> str:
    found = next((n for n in wanted if n in names), None)
    if found is None:
        raise ValueError(f"{source}: needs a column named one of {', '.join(wanted)}; it has {', '.join(names)}")
    return found


def _records(path: Path, suffix: str) -> list:
    if suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_metadata(path: Path, root: Path) -> dict[str, list[str]]:
    """{absolute image path: captions} from a JSONL, CSV or parquet file; paths relative to the data folder."""
    if not path.is_file():
        raise ValueError(f"metadata_file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise ValueError(f"metadata_file {path}: use a .jsonl, .csv or .parquet file")
    try:
        records = _records(path, suffix)
    except (csv.Error, RecursionError, UnicodeDecodeError) as e:  # a field over csv's limit, 10^5-deep JSON, ...
        raise ValueError(f"{path}: cannot be read as {suffix[1:]}: {type(e).__name__}: {str(e)[:120]}") from None
    if not records:
        return {}
    # One object per row, each caption a string or a list of strings: a row `5` or a caption `[1, 2]` is a
    # mistake to name here, before any work, not an AttributeError in a worker.
    for i, r in enumerate(records, 1):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: row {i} is not an object ({type(r).__name__}); each row has file_name and "
                             'caption keys, e.g. {"file_name": "a.png", "caption": "a red circle"}')
    key = _column(list(records[0]), PATH_COLUMNS, path)
    text = _column(list(records[0]), CAPTION_COLUMNS, path)
    out = {}
    for i, r in enumerate(records, 1):
        value = r.get(text)
        captions = ([value] if isinstance(value, str) else [] if value is None
                    else list(value) if isinstance(value, list) else None)
        if captions is None or not all(isinstance(c, str | None) for c in captions):
            raise ValueError(f"{path}: row {i}: its {text} is not a string or a list of strings")
        if not isinstance(r.get(key), str | int) or not str(r[key]).strip():
            raise ValueError(f"{path}: row {i}: its {key} is missing or not a file name")
        out[str((root / str(r[key])).resolve())] = [c.strip() for c in captions if c and c.strip()]
    return out


def find_mask(image: Path, suffix: str) -> Path | None:
    """The mask file beside `image` (NAME<suffix> with any image extension), or None."""
    found = [image.with_name(image.stem + suffix + ext) for ext in sorted(IMAGE_EXTS)]
    return next((m for m in found if m.is_file()), None)


def discover(ds: DatasetConfig, alignment: int = 64) -> tuple[list[Item], list[dict]]:
    """Every image under ds.instance_data_dir (recursive, sorted) with its captions, one Item per resolution, and
    the files skipped (with the reason) because they have no usable caption or no mask."""
    given = Path(ds.instance_data_dir)
    root = given.resolve()
    # Under a resolved root only a file itself can be a link (rglob does not enter linked folders), so a path is
    # resolved only when it is one: resolving each costs a stat per path component. Sorted by parts, as Paths sort.
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                   key=lambda p: p.parts)
    if ds.mask_suffix:
        files = [p for p in files if not p.stem.endswith(ds.mask_suffix)]
    if not files:
        raise ValueError(f"data set '{ds.id}': no images ({', '.join(sorted(IMAGE_EXTS))}) under {given}")
    metadata = read_metadata(ds.metadata_file, root) if ds.caption_strategy == "metadata" else {}
    sizings = [s.to_json() for s in sizings_of(ds, alignment)]
    items, skipped = [], []
    for p in files:
        path = str(p.resolve() if p.is_symlink() else p)
        try:
            captions = _captions(p, path, ds, metadata)
        except CaptionError as e:
            skipped.append({"path": path, "reason": str(e)})
            continue
        mask = find_mask(p, ds.mask_suffix) if ds.mask_suffix else None
        if ds.mask_suffix and mask is None:
            skipped.append({"path": path, "reason": f"no mask {p.stem}{ds.mask_suffix}.png (or another image "
                                                    f"extension) beside it; data set '{ds.id}' has mask_suffix set"})
            continue
        items += [Item(path, captions[0], ds.id, sizing, tuple(captions[1:]), str(mask.resolve()) if mask else "",
                       ds.is_regularisation_data, ds.repeats) for sizing in sizings]
    if metadata:
        found = {it.path for it in items} | {s["path"] for s in skipped}
        skipped += [{"path": m, "reason": f"listed in {ds.metadata_file.name} but not an image under {given}"}
                    for m in sorted(set(metadata) - found)]
    return items, skipped


def _captions(image: Path, path: str, ds: DatasetConfig, metadata: dict[str, list[str]]) -> list[str]:
    if ds.caption_strategy == "instanceprompt":
        return [ds.instance_prompt or ""]
    if ds.caption_strategy == "metadata":
        if path not in metadata:
            raise CaptionError(f"no row for {image.name} in {ds.metadata_file.name}")
        if not metadata[path]:
            raise CaptionError(f"empty caption for {image.name} in {ds.metadata_file.name}")
        return metadata[path]
    if ds.caption_strategy == "textfile":
        txt = image.with_suffix(".txt")
        if txt.is_file():
            return read_caption_file(txt)
    return [image.stem.replace("_", " ").strip()]  # underscores only, as SimpleTuner: "t-shirt" stays a word
