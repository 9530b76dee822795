"""curves.png: the loss panel alone, or with the CLIP score beside it when metrics.jsonl has one; a line cut short
by a kill is skipped; nothing is drawn before the first loss."""

import json

from PIL import Image

from raytune_sd3.driver.curves import plot_training_curves, read_metrics


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_loss_alone_or_beside_the_clip_score(tmp_path):
    metrics, png = tmp_path / "metrics.jsonl", tmp_path / "curves.png"
    records = [{"step": 0, "eval_loss": 1.0}] + [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    _write(metrics, records, tail='{"step": 6, "lo')  # killed mid-line
    assert len(read_metrics(metrics)) == 6
    assert plot_training_curves(metrics, png) == png
    with Image.open(png) as im:
        assert im.size == (650, 450)  # one panel
    records[3]["clip_score"] = 21.5
    records[5]["clip_score"] = float("nan")  # not drawn
    _write(metrics, records)
    plot_training_curves(metrics, png)
    with Image.open(png) as im:
        assert im.size == (1300, 450)  # loss, CLIP score
    assert not list(tmp_path.glob(".*"))  # written atomically, no temp file left


def test_nothing_to_draw_before_the_first_loss(tmp_path):
    assert plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png") is None
    assert not (tmp_path / "curves.png").exists()
