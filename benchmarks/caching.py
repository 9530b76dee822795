"""Caching throughput: the Ray Data caching stage against a single-process loop doing the same encoding.

    python benchmarks/caching.py                          # 96 generated images of mixed shapes, tiny-sd3, 128 px
    python benchmarks/caching.py --images 400 --resolution 512 --model /path/to/sd3.5-diffusers

Both sides start from the same image folder and fill a fresh cache with the same entries:
  Ray Data        `build_cache`, as `python -m raytune_sd3.cache` runs it: hashing and decode/resize/crop in CPU
                  tasks, the VAE and the text encoders in actor pools (1 per GPU; data.encode_actors on CPU), on a
                  Ray that is already up (its start is in overhead.py's figures)
  single process  one Python loop: the same hashing, decode, aspect-bucket resize/crop, VAE posterior sample,
                  CLIP-L + CLIP-G + T5 encoding of each unique caption and the same atomic writes, batched by
                  bucket like the actors
Model loading counts on both sides (it is part of what a caching run costs). Figures: images/s (each image's
latent plus its share of the caption work), the ratio Ray Data / single process, and the cache size per image,
medians over --repeats. On GPUs the actor pools scale with the GPU count; on this CPU they share its cores with
the decode tasks, so the ratio shows the pipeline's overhead rather than its scaling.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, command, machine, machine_line, median, table, write_section

CPU_NOTE = ("On a CPU the Ray Data side is dominated by fixed costs the loop does not pay: Ray Data's executor and the encoder actors' start (each imports torch, diffusers and transformers and loads its models in a fresh process), 25-50 s on this 2-core machine, against seconds of encoding with the tiny model; the first run also starts the worker processes. A warm cache skips Ray Data altogether (images whose stat the cache's index knows are not opened; warmstart.py measures it). The figure that matters, the scaling of the actor pools over GPUs, needs a GPU machine.")
SHAPES = [(4, 3), (3, 4), (1, 1), (16, 9), (9, 16), (3, 2), (2, 3)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="images to generate (default 96)")
    p.add_argument("--captions", type=int, default=32, help="distinct captions among them (default 32)")
    p.add_argument("--resolution", type=int, default=128, help="training resolution, pixel_area (default 128)")
    p.add_argument("--model", default="tiny-sd3", help="diffusers SD3 folder or tiny-sd3 (default)")
    p.add_argument("--batch-size", type=int, default=8, help="data.encode_batch_size (default 8)")
    p.add_argument("--actors", type=int, default=None, help="data.encode_actors (default: as the job would)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (default 2)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def make_images(folder: Path, n: int, n_captions: int, resolution: int, seed: int = 0) -> None:
    """Photo-like files of mixed shapes, about 1.5x the training size (so each is resized), JPEG and PNG, with a
    caption .txt each (`n_captions` distinct ones, so identical captions are shared as in real data)."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        aw, ah = SHAPES[i % len(SHAPES)]
        scale = 1.5 * resolution / (aw * ah) ** 0.5
        w, h = round(aw * scale), round(ah * scale)
        noise = np.random.default_rng([seed, i]).integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(noise).resize((w, h), Image.Resampling.BICUBIC).filter(ImageFilter.GaussianBlur(2))
        im.save(folder / (f"{i:05d}.jpg" if i % 2 else f"{i:05d}.png"), quality=92)
        (folder / f"{i:05d}.txt").write_text(f"a photo of subject {rng.randrange(n_captions)} in the style {i % 3}")


def ray_data_side(spec, items, batch_size: int, actors: int | None) -> float:
    from raytune_sd3.data.encode import build_cache

    t0 = time.perf_counter()
    report = build_cache(spec, items, [""], batch_size, actors)
    seconds = time.perf_counter() - t0
    assert report.latents_encoded == len(items) and not report.skipped, report.summary()
    return seconds


def single_process_side(spec, items, batch_size: int) -> float:
    """The same work in one loop: what a one-box trainer's caching pass does."""
    import hashlib

    import numpy as np
    import torch

    from raytune_sd3.data.buckets import Sizing, plan, seed_from_key
    from raytune_sd3.data.encode import encode_latents, pixels_to_tensor
    from raytune_sd3.data.pixels import image_problem, image_size, load_image
    from raytune_sd3.data.store import CacheStore
    from raytune_sd3.models.loading import DTYPES, load_text_encoders, load_vae
    from raytune_sd3.models.text import encode_prompts

    t0 = time.perf_counter()
    store = CacheStore(spec.cache_dir)
    vae = load_vae(spec.pretrained, "cpu", torch.float32, spec.revision)
    encoders = load_text_encoders(spec.pretrained, "cpu", DTYPES[spec.text_encoder_dtype], spec.revision)
    by_size: dict[tuple[int, int], list[tuple[str, str]]] = {}
    for it in items:
        sizing = Sizing.from_json(it.sizing)
        assert not image_problem(it.path, sizing, 250_000_000)
        key = spec.latent_key(hashlib.sha256(Path(it.path).read_bytes()).hexdigest(), it.sizing)
        if store.has("latents", key):
            continue
        p = plan(*image_size(it.path), sizing, seed_from_key(key))
        by_size.setdefault(p.size, []).append((key, it.path, p))
    for group in by_size.values():
        for i in range(0, len(group), batch_size):
            chunk = group[i:i + batch_size]
            pixels = np.stack([load_image(path, p) for _, path, p in chunk])
            keys = [k for k, _, _ in chunk]
            lat = encode_latents(vae, pixels_to_tensor(pixels), keys, spec.vae_shift, spec.vae_scale)
            for k, t in zip(keys, lat.to(DTYPES[spec.dtype]), strict=True):
                store.write("latents", k, {"latents": t})
    captions = sorted({c for it in items for c in it.captions} | {""})
    todo = [(c, spec.text_key(c)) for c in captions if not store.has("text", spec.text_key(c))]
    for i in range(0, len(todo), batch_size):
        chunk = todo[i:i + batch_size]
        embeds, pooled = encode_prompts(encoders, [c for c, _ in chunk], spec.t5_max_length, spec.t5_padding)
        for (_, k), e, pl in zip(chunk, embeds, pooled, strict=True):
            store.write("text", k, {"prompt_embeds": e.to(DTYPES[spec.dtype]), "pooled": pl.to(DTYPES[spec.dtype])})
    return time.perf_counter() - t0


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import dataclasses

    from raytune_sd3.config import load_job
    from raytune_sd3.data.buckets import Sizing, plan
    from raytune_sd3.data.discovery import discover
    from raytune_sd3.data.pixels import image_size
    from raytune_sd3.driver.caching import cache_spec
    from raytune_sd3.driver.runtime import init_ray
    from raytune_sd3.testmodels.resolve import resolve_pretrained

    work = Path(tempfile.mkdtemp(prefix="raytune_sd3-bench-caching-"))
    images = work / "images"
    make_images(images, args.images, args.captions, args.resolution)
    sets = [f"output_dir={work / 'out'}", "data.datasets.0.type=local", f"data.datasets.0.instance_data_dir={images}",
            f"data.datasets.0.resolution={args.resolution}", "data.datasets.0.resolution_type=pixel_area",
            f"model.pretrained={args.model}", "data.bucket_alignment=16" if args.resolution < 512 else
            "data.bucket_alignment=64", "ray.num_cpus=4"]
    cfg = load_job(Path(__file__).resolve().parents[1] / "jobs" / "tiny.yaml", sets)
    pretrained = str(resolve_pretrained(cfg.model.pretrained))
    init_ray(cfg)
    base_spec = cache_spec(cfg, pretrained)
    items, _ = discover(cfg.data.datasets[0], cfg.data.bucket_alignment)
    buckets = len({plan(*image_size(it.path), Sizing.from_json(it.sizing), 0).size for it in items})

    ray_s, single_s, sizes = [], [], {}
    for r in range(args.repeats):
        for side in ("ray", "single"):
            cache = work / f"cache-{side}-{r}"
            spec = dataclasses.replace(base_spec, cache_dir=str(cache))
            if side == "ray":
                ray_s.append(ray_data_side(spec, items, args.batch_size, args.actors))
            else:
                single_s.append(single_process_side(spec, items, args.batch_size))
            sizes[side] = (folder_bytes(cache / "latents"), folder_bytes(cache / "text"))
            print(f"run {r + 1}/{args.repeats} {side}: {(ray_s if side == 'ray' else single_s)[-1]:.1f} s",
                  file=sys.stderr)
            shutil.rmtree(cache, ignore_errors=True)
    import ray

    ray.shutdown()
    n = len(items)
    ray_ips, single_ips = n / median(ray_s), n / median(single_s)
    lat_b, text_b = sizes["ray"]
    captions = len({c for it in items for c in it.captions}) + 1
    info = machine()
    result = {"images": n, "buckets": buckets, "captions": captions, "ray_s": ray_s, "single_s": single_s,
              "ray_images_per_s": ray_ips, "single_images_per_s": single_ips, "ratio": ray_ips / single_ips,
              "latent_bytes_per_image": lat_b / n, "text_bytes_per_caption": text_b / captions,
              "cache_bytes_per_image": (lat_b + text_b) / n, "machine": info}
    rows = [["Ray Data pipeline", f"{median(ray_s):.1f}", f"{ray_ips:.2f}", f"{ray_ips / single_ips:.2f}x"],
            ["single-process loop", f"{median(single_s):.1f}", f"{single_ips:.2f}", "1.00x"]]
    body = "\n\n".join([
        f"Measured {machine_line(info)}. Command: {command('caching.py', argv)}.",
        f"{n} generated images of {len(SHAPES)} shapes in {buckets} aspect buckets ({args.resolution} px of area, "
        f"model `{args.model}`, dtype {cfg.model.dtype}), {captions} distinct captions with the empty one; "
        f"encode batch {args.batch_size}; medians of {args.repeats} runs, each into a fresh cache.",
        table(["", "seconds", "images/s", "vs single process"], rows),
        f"Cache size: {lat_b / n / 1024:.1f} KiB of latents per image, {text_b / captions / 1024:.1f} KiB per "
        f"distinct caption ({(lat_b + text_b) / n / 1024:.1f} KiB per image in all here; {cfg.model.dtype} "
        "entries: bf16 halves them). A real SD3 latent at 1024x1024 is 16x128x128 values (512 KiB in bf16), a "
        "caption with 154 T5 tokens 231x4096 + 2048 values (1.8 MiB in bf16).",
        *([CPU_NOTE] if info["gpu"] == "none" else []),
    ])
    print(body)
    if not args.no_write:
        write_section("caching", body, args.results)
    return result


if __name__ == "__main__":
    main()
