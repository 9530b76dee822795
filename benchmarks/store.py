"""A data set in a bucket: seconds to list and to warm-check N objects on a local S3 server, per object, and to 1M.

    python benchmarks/store.py                      # 100,000 objects in 100 sub-folders
    python benchmarks/store.py --objects 5000 --no-write

A real S3 protocol server (moto, in its own process, as tests/test_remote_cache.py runs it) holds N small PNGs
(each its own bytes) under s3://bench/set/ in --folders sub-folders. They are put into the server's store by the
server process itself before it starts answering (moto's backend, `put_object`): uploading them over HTTP cost
~9 ms an object here, 15 minutes for 100,000, and is no part of what is measured. Everything timed goes through
the server's HTTP API with our real client; one object is read back and compared first. Timed, median of --repeats:
  one listing   pyarrow's recursive FileSelector from the root: one paginated stream of ListObjectsV2 requests
                (1,000 keys each), the baseline
  our listing   data/sources.py's DataFolder.listing: the first levels walked, each sub-folder's tree listed in
                its own thread
  cold          `discover` of the data set (listing, names, sizing; captions from file names, so no object is
                read): what a first run does before its Ray tasks read the images
  warm          `discover`, then the caching stage's keying (`_keyed`) against a stat index that knows every
                object: each object's record found by its listed (URI, size, mtime), no object read (checked: the
                index's hits equal N and no read happened), its cache entry looked up in a local cache
moto is a Python server on the same cores, so every figure includes the server's own time: a real store answers
a listing page in tens of milliseconds from elsewhere, with the client's cores free.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, command, machine, machine_line, median, table, write_section

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objects", type=int, default=100_000, help="images in the bucket (default 100,000)")
    p.add_argument("--folders", type=int, default=100, help="sub-folders they are spread over (default 100)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each (default 3)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where to write the section (default RESULTS.md)")
    p.add_argument("--no-write", action="store_true", help="print only")
    return p.parse_args(argv)


def png(i: int) -> bytes:
    import numpy as np
    from PIL import Image

    px = np.full((16, 16, 3), 128, dtype=np.uint8)
    px[0, :4] = np.frombuffer(i.to_bytes(12, "little"), dtype=np.uint8).reshape(4, 3)
    out = io.BytesIO()
    Image.fromarray(px).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def key(i: int, folders: int) -> str:
    return f"set/part{i % folders:04d}/img_{i:07d}.png"


# Run in the server's process before conftest's S3_SERVER starts it: the bucket and its objects, straight into
# moto's store (the state an upload leaves, without 100,000 HTTP requests through a Python server).
SEED = f"""
import inspect, io, os
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

{inspect.getsource(png)}
{inspect.getsource(key)}
n, folders = map(int, os.environ["BENCH_SEED"].split(","))
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
backend.create_bucket("bench", "us-east-1")
for i in range(n):
    backend.put_object("bench", key(i, folders), png(i))
"""


def seeded_server(n: int, folders: int):
    """conftest's S3Server, its store holding the bench bucket's n objects before it answers its first request."""
    from tests import conftest

    plain = conftest.S3_SERVER
    conftest.S3_SERVER = SEED + plain
    try:
        server = conftest.S3Server(env={"BENCH_SEED": f"{n},{folders}"})
    finally:
        conftest.S3_SERVER = plain
    # S3Server waits 10 s for the port; seeding takes longer: wait here until it answers
    for _ in range(max(600, n // 50)):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", server.port)) == 0:
                return server
        if server.process.poll() is not None:
            raise RuntimeError(f"the S3 server exited ({server.process.returncode}) while seeding")
        time.sleep(0.1)
    server.close()
    raise RuntimeError("the S3 server did not answer after seeding")


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return median(times), out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import pyarrow.fs as pafs

    from raytune_sd3.config import load_job
    from raytune_sd3.data import encode
    from raytune_sd3.data.discovery import discover
    from raytune_sd3.data.encode import _keyed
    from raytune_sd3.data.files import CacheFiles
    from raytune_sd3.data.index import ImageFacts, StatIndex
    from raytune_sd3.data.sources import DataFolder, sources_of
    from raytune_sd3.driver.caching import cache_spec
    from raytune_sd3.testmodels.resolve import resolve_pretrained

    work = Path(tempfile.mkdtemp(prefix="raytune_sd3-bench-store-"))
    t = time.perf_counter()
    server = seeded_server(args.objects, args.folders)
    try:
        print(f"server up with {args.objects} objects in {time.perf_counter() - t:.1f} s", flush=True)
        last = args.objects - 1
        with server.fs.open_input_stream(f"bench/{key(last, args.folders)}") as f:
            assert f.read() == png(last), "the seeded server does not serve the object's bytes"
        uri = f"s3://bench/set?{server.query}"
        cfg = load_job(ROOT / "jobs" / "tiny.yaml", [f"output_dir={work / 'out'}", f"data.cache_dir={work / 'cache'}",
                                                      f"data.datasets.0.instance_data_dir={uri}",
                                                      "data.datasets.0.type=local",
                                                      "data.datasets.0.caption_strategy=filename"])
        ds = cfg.data.datasets[0]
        folder = DataFolder(uri)

        one_s, infos = timed(lambda: [i for i in server.fs.get_file_info(pafs.FileSelector("bench/set",
                             recursive=True)) if i.type == pafs.FileType.File], args.repeats)
        ours_s, ours = timed(folder.listing, args.repeats)
        assert len(ours) == len(infos) == args.objects, (len(ours), len(infos))
        cold_s, (items, _) = timed(lambda: discover(ds, cfg.data.bucket_alignment), args.repeats)

        # A stat index that knows every object, as a finished first run leaves it (facts as the listing gave them).
        spec = cache_spec(cfg, str(resolve_pretrained(cfg.model.pretrained)))
        index = StatIndex(CacheFiles(spec.cache_dir))
        recorded = time.time_ns() + 10**10
        for it in items:
            index.add_image(it.path, ImageFacts("0" * 64, 16, 16, *it.stat), recorded)
        index.save()
        sources = sources_of([uri])
        reads = []
        plain_read = encode.read_file
        encode.read_file = lambda *a: reads.append(a) or plain_read(*a)

        def warm() -> int:
            found, _ = discover(ds, cfg.data.bucket_alignment)
            loaded = StatIndex.load(CacheFiles(spec.cache_dir))
            rows = [{**it.to_row(), "uid": i, "stat": list(it.stat), "mask_stat": []} for i, it in enumerate(found)]
            _keyed(rows, spec, 10**9, {}, loaded, sources)
            return loaded.hits

        warm_s, hits = timed(warm, args.repeats)
        encode.read_file = plain_read
        assert hits == args.objects and not reads, (hits, len(reads))
    finally:
        server.close()
        shutil.rmtree(work, ignore_errors=True)

    n = args.objects
    result = {"objects": n, "folders": args.folders, "one_listing_s": one_s, "our_listing_s": ours_s,
              "cold_discovery_s": cold_s, "warm_s": warm_s}
    print(json.dumps(result), flush=True)
    info = machine()
    rows = [[name, f"{s:.2f}", f"{1e3 * s / n:.3f}", f"{s * 1e6 / n / 60:.1f}"]
            for name, s in (("one recursive listing (pyarrow, baseline)", one_s), ("our listing", ours_s),
                            ("cold discovery (listing + items)", cold_s),
                            ("warm check (discovery + stat index, no object read)", warm_s))]
    body = "\n\n".join([
        f"Measured {machine_line(info)}. Command: {command('store.py', argv)}. {n:,} objects in "
        f"{args.folders} sub-folders on a moto S3 server on the same cores (see the script's docstring); medians "
        f"of {args.repeats} runs. Goal on 2 cores: cold discovery under 1 ms and a warm start under 0.2 ms an "
        "object.",
        table(["step", "seconds", "ms/object", "minutes at 1M (linear)"], rows),
        f"Our listing against one recursive listing: {one_s / ours_s:.2f}x.",
    ])
    print(body)
    if not args.no_write:
        write_section(f"a data set in a bucket: listing and warm check ({info['cores']} CPU cores)", body,
                      args.results)
    return result


if __name__ == "__main__":
    main()
