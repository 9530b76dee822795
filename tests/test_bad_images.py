"""Real photo collections are messy: every kind of odd or broken file, made with Pillow here, is either decoded
right or skipped and reported with the reason; one bad file never stops the job."""

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytune_sd3.config import DatasetConfig
from raytune_sd3.data.buckets import Sizing
from raytune_sd3.data.discovery import discover
from raytune_sd3.data.manifest import read_manifest
from raytune_sd3.data.pixels import decode, image_problem
from raytune_sd3.run_layout import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
RED, BLUE = (255, 0, 0), (0, 0, 255)


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A 1x1 PNG whose header claims width x height: what a decompression bomb looks like before decoding."""
    Image.new("RGB", (1, 1), RED).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))


def make_zoo(folder: Path) -> dict[str, str]:
    """Every kind of file the issue lists; returns {file name: expected skip reason fragment} for the bad ones."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("L", (48, 40), 100).save(folder / "grey.png")
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(folder / "cmyk_red.jpg", quality=95)
    palette = Image.new("P", (48, 40), 0)
    palette.putpalette([0, 255, 0] + [0, 0, 255] * 255)
    palette.info["transparency"] = 0
    palette.save(folder / "palette_transparent.png", transparency=0)
    Image.new("RGBA", (48, 40), (0, 0, 255, 0)).save(folder / "rgba_transparent.png")
    Image.fromarray(np.full((40, 48), 128 * 257, np.uint16)).save(folder / "sixteen_bit.png")
    rotated = Image.new("RGB", (64, 32), RED)
    rotated.paste(Image.new("RGB", (32, 32), BLUE), (32, 0))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: show rotated 90 degrees clockwise -> red top, blue bottom
    rotated.save(folder / "exif_rotated.jpg", exif=exif, quality=95)
    Image.new("RGB", (48, 40), RED).save(folder / "good_red.jpg")

    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "truncated.jpg", quality=95)  # noise: the pixel data outweighs the header
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    (folder / "zero_bytes.png").write_bytes(b"")
    (folder / "not_an_image.png").write_text("a text file with an image extension")
    _png_claiming(folder / "bomb.png", 60000, 60000)
    Image.new("RGB", (20, 40), RED).save(folder / "too_small.png")
    Image.new("RGB", (48, 40), BLUE).save(folder / "empty_caption.png")
    (folder / "empty_caption.txt").write_text("  \n")
    Image.new("RGB", (48, 40), BLUE).save(folder / "latin1_caption.png")
    (folder / "latin1_caption.txt").write_bytes("un caf\xe9 bleu".encode("latin-1"))
    Image.new("RGB", (48, 40), BLUE).save(folder / "bom_caption.png")
    (folder / "bom_caption.txt").write_bytes("\ufeffa blue square\n".encode())
    Image.new("RGB", (48, 40), RED).save(folder / "two_captions.png")
    (folder / "two_captions.txt").write_text("a red rectangle\na scarlet block\n")
    return {"truncated.jpg": "cannot decode", "zero_bytes.png": "not a readable image",
            "not_an_image.png": "not a readable image", "bomb.png": "too large", "too_small.png": "too small",
            "empty_caption.png": "is empty", "latin1_caption.png": "not UTF-8"}


MIN24 = Sizing(32, "pixel", minimum_image_size=24)


def test_each_kind_is_decoded_right_or_has_a_reason(tmp_path):
    bad = make_zoo(tmp_path / "zoo")
    ds = DatasetConfig(id="zoo", instance_data_dir=tmp_path / "zoo", resolution=32, minimum_image_size=24)
    items, skipped = discover(ds)
    captions = {Path(it.path).name: it.caption for it in items}
    assert captions["bom_caption.png"] == "a blue square"  # BOM and newline gone
    assert captions["grey.png"] == "grey"  # no caption file: the file name
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped}
    assert set(reasons) == {"empty_caption.png", "latin1_caption.png"}
    assert "is empty" in reasons["empty_caption.png"] and "not UTF-8" in reasons["latin1_caption.png"]

    folder = tmp_path / "zoo"
    for name in ["zero_bytes.png", "not_an_image.png", "bomb.png", "too_small.png"]:
        assert bad[name] in image_problem(str(folder / name), MIN24, 250_000_000), name
    assert "too large" in image_problem(str(folder / "good_red.jpg"), Sizing(32), 48 * 40 - 1)
    assert image_problem(str(folder / "truncated.jpg"), MIN24, 250_000_000) == ""  # its header is fine...
    with pytest.raises(OSError):
        decode(str(folder / "truncated.jpg"), Sizing.square(32))  # ...its pixels are not: skipped at decoding

    def px(name: str) -> np.ndarray:
        assert image_problem(str(folder / name), MIN24, 250_000_000) == "", name
        out = decode(str(folder / name), Sizing.square(32))
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        return out.astype(int)

    assert (px("grey.png") == 100).all()
    assert (px("sixteen_bit.png") == 128).all()  # scaled from 16 bits, not clipped to white
    assert (px("rgba_transparent.png") == 255).all() and (px("palette_transparent.png") == 255).all()
    red = px("cmyk_red.jpg")[16, 16]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60, red
    rotated = px("exif_rotated.jpg")  # red on top, blue below, as a viewer shows it
    assert rotated[2, 16, 0] > 200 and rotated[2, 16, 2] < 60, rotated[2, 16]
    assert rotated[29, 16, 2] > 200 and rotated[29, 16, 0] < 60, rotated[29, 16]


@pytest.mark.slow
def test_cache_cli_skips_and_reports_bad_files_and_encodes_the_rest(tmp_path, ray_local, capsys):
    """`python -m raytune_sd3.cache --data DIR` on the zoo (its main, run on the tests' Ray): Ray Data (2 actors)
    encodes every usable image with its .txt caption (else its file name); the report lists each bad one with its
    reason."""
    from raytune_sd3.cache import main

    bad = make_zoo(tmp_path / "zoo")
    assert main([str(ROOT / "jobs" / "tiny.yaml"), "--data", str(tmp_path / "zoo"),
                 "--set", f"output_dir={tmp_path / 'out'}", "--set", "data.datasets.0.minimum_image_size=24",
                 "--set", "data.datasets.0.resolution_type=pixel", "--set", "data.encode_actors=2"]) == 0
    stderr = capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "cache_report.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(reasons) == set(bad), reasons
    assert all(bad[name] in reasons[name] for name in bad), reasons
    assert report["items"] == report["latents_encoded"] == 9
    for name in bad:
        assert name in stderr  # printed too, not only in the file
    manifest = read_manifest(tmp_path / "out" / MANIFEST)  # (a rerun's reuse: test_train_e2e)
    assert sorted(row["caption"] for row in manifest["rows"])[:2] == ["a blue square", "a red rectangle"]
    two = next(row for row in manifest["rows"] if row["path"].endswith("two_captions.png"))
    assert len(set(two["text_keys"])) == 2 and two["text_keys"][0] == two["text_key"]  # both encoded, first first



def test_a_data_set_with_nothing_usable_is_a_clear_error(tmp_path, tiny_sd3, ray_local):
    from raytune_sd3.config import load_job
    from raytune_sd3.driver.caching import prepare_data

    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"")
    (folder / "b.jpg").write_text("not a jpeg")
    cfg = load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={tmp_path / 'out'}"], data_dir=folder)
    with pytest.raises(RuntimeError, match=r"data set\(s\) junk: no usable image; .*cache_report.json"):
        prepare_data(cfg, tiny_sd3)
    report = json.loads((tmp_path / "out" / "cache_report.json").read_text())
    assert sorted(Path(s["path"]).name for s in report["skipped"]) == ["a.png", "b.jpg"]
