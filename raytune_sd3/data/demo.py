"""A demo data set a tiny model can learn from: coloured shapes on plain backgrounds, captioned by colour and shape.

Generated on first use (deterministic for a seed) so the demo job needs no files prepared by hand.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, colour: tuple, background: tuple, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), background)
    d = ImageDraw.Draw(img)
    r = size * rng.uniform(0.25, 0.38)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=colour)
    return img


def make_demo_dataset(out_dir: str | Path, n_images: int = 48, size: int = 64, seed: int = 0) -> Path:
    """Write `n_images` PNGs with a caption .txt beside each into out_dir (atomic; kept if already complete)."""
    out_dir = Path(out_dir)
    if (out_dir / ".complete").exists():
        return out_dir
    rng = random.Random(seed)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]
    for i in range(n_images):
        colour, shape, bg = combos[i % len(combos)]
        _draw(shape, COLOURS[colour], BACKGROUNDS[bg], size, rng).save(tmp / f"{i:05d}.png")
        (tmp / f"{i:05d}.txt").write_text(f"a {colour} {shape} on a {bg} background")
    (tmp / ".complete").write_text(f"{n_images} {size} {seed}\n")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, out_dir)
    except OSError:  # another process finished first, or an incomplete folder is in the way
        if (out_dir / ".complete").exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(out_dir, ignore_errors=True)
            os.replace(tmp, out_dir)
    return out_dir
