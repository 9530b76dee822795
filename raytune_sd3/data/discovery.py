"""Finding the images of a data set and their captions; what cannot be used is listed with the reason, not fatal."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from raytune_sd3.config import DatasetConfig

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class Item:
    """One training image: where it is, its caption and how it is to be sized."""

    path: str
    caption: str
    dataset_id: str
    resolution: int
    min_side: int = 0

    def to_row(self) -> dict:
        return asdict(self)


class CaptionError(ValueError):
    """A caption that cannot be used; the message says why and what to do."""


def read_caption_file(txt: Path) -> str:
    """A caption file's text: UTF-8 (a BOM is allowed), stripped; empty or undecodable files raise CaptionError."""
    try:
        text = txt.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError as e:
        raise CaptionError(f"caption file {txt.name} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    if not text:
        raise CaptionError(f"caption file {txt.name} is empty; write a caption or delete it to use the file name")
    return text


def caption_for(image: Path, ds: DatasetConfig) -> str:
    if ds.caption_strategy == "instanceprompt":
        return ds.instance_prompt or ""
    if ds.caption_strategy == "textfile":
        txt = image.with_suffix(".txt")
        if txt.is_file():
            return read_caption_file(txt)
    return image.stem.replace("_", " ").replace("-", " ").strip()


def discover(ds: DatasetConfig) -> tuple[list[Item], list[dict]]:
    """Every image under ds.instance_data_dir (recursive, sorted) with its caption, and the files skipped (with
    the reason) because their caption cannot be used."""
    root = Path(ds.instance_data_dir)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ValueError(f"data set '{ds.id}': no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
    items, skipped = [], []
    for p in files:
        try:
            caption = caption_for(p, ds)
        except CaptionError as e:
            skipped.append({"path": str(p.resolve()), "reason": str(e)})
            continue
        items.append(Item(str(p.resolve()), caption, ds.id, ds.resolution, ds.minimum_image_size or 0))
    return items, skipped
