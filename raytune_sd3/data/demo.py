"""A demo data set a tiny model can learn from: coloured shapes on plain backgrounds, captioned by colour and shape.

Generated on first use (deterministic for a seed) so the demo job needs no files prepared by hand.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from raytune_sd3 import atomic

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
COMPLETE = ".complete"  # the file a finished demo folder holds


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
    if (out_dir / COMPLETE).exists():
        return out_dir
    rng = random.Random(seed)
    combos = [(c, s, b) for c in COLOURS for s in SHAPES for b in BACKGROUNDS]

    def write(tmp: Path) -> None:
        for i in range(n_images):
            colour, shape, bg = combos[i % len(combos)]
            _draw(shape, COLOURS[colour], BACKGROUNDS[bg], size, rng).save(tmp / f"{i:05d}.png")
            (tmp / f"{i:05d}.txt").write_text(f"a {colour} {shape} on a {bg} background")
        (tmp / COMPLETE).write_text(f"{n_images} {size} {seed}\n")

    # Another process that finished first keeps its copy; an incomplete folder in the way is replaced.
    return atomic.write_folder(out_dir, write, done=COMPLETE)
