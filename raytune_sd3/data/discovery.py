"""Finding the images of a data set and their captions."""

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

    def to_row(self) -> dict:
        return asdict(self)


def caption_for(image: Path, ds: DatasetConfig) -> str:
    if ds.caption_strategy == "instanceprompt":
        return ds.instance_prompt or ""
    if ds.caption_strategy == "textfile":
        txt = image.with_suffix(".txt")
        if txt.is_file():
            return txt.read_text(encoding="utf-8", errors="replace").strip()
    return image.stem.replace("_", " ").replace("-", " ").strip()


def discover(ds: DatasetConfig) -> list[Item]:
    """Every image under ds.instance_data_dir (recursive, sorted), with its caption."""
    root = Path(ds.instance_data_dir)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ValueError(f"data set '{ds.id}': no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
    return [Item(str(p.resolve()), caption_for(p, ds), ds.id, ds.resolution) for p in files]
