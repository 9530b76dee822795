"""WebDataset shards (type webdataset): tar files whose members sharing a base name make one sample
(`000123.jpg` + `000123.txt`), local or in object storage, listed as `urls` (brace patterns such as
`shard-{000..099}.tar`, or a folder of .tar files).

Discovery runs on the driver before Ray starts (the preflight, `check` and the warm start need it without Ray), so
the shards are read here with the standard library's tarfile over pyarrow's filesystems rather than Ray Data's
WebDataset reader, which reads whole shards inside Ray tasks. Only the tar headers and the caption members are read:
one thread per shard (sharded by shard), each reading its shard in READ_AHEAD blocks, so a header, a caption and
the next header come in one request while an image's bytes are skipped. Each sample becomes an Item named
`<shard>#member=<name>&offset=<n>&size=<n>` (the shard by its path, or its URI without query or credentials); the
caching tasks read its image with one ranged read of the shard (read_member), so no image passes through the
driver and no node needs a copy. A member's stat is (its size, the shard's mtime): the stat index keys it like any
object, so a warm run reads no image byte.
"""

from __future__ import annotations

import functools
import io
import itertools
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow.fs as pafs

from raytune_sd3.config import DatasetConfig, is_uri
from raytune_sd3.data.files import filesystem, redacted
from raytune_sd3.data.sources import CREDENTIALS_FIX

MEMBER, OFFSET, SIZE = "#member=", "&offset=", "&size="
READ_AHEAD = 1 << 16  # bytes per request while reading headers: a header, a caption and the next header fit
SHARD_THREADS = 64  # shards indexed at once: a shard is a chain of requests (about one per sample whose image
# exceeds READ_AHEAD), so threads wait, not compute, and the shards side by side are what makes discovery fast


class WebDatasetError(ValueError):
    """Shards that cannot be used (none found, one missing, one not a tar, no image member); the message says which
    and what to fix."""


@dataclass(frozen=True)
class ShardFile:
    """One shard: its name (path, or URI without query or credentials) and where it is (the URI with its options)."""

    name: str
    location: str


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: its image member's name, the offset of its bytes and their size, and its caption
    member (name, bytes), None when it has none."""

    member: str
    offset: int
    size: int
    caption: tuple[str, bytes] | None


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> a-000.tar, a-001.tar, a-002.tar (the width of the first bound is kept); `{a,b}` ->
    both; several braces -> every combination, in order. WebDataset's shard notation (as bash's)."""
    parts = re.split(r"(\{[^{}]*\})", pattern)
    choices = []
    for part in parts:
        if not (part.startswith("{") and part.endswith("}")):
            choices.append([part])
            continue
        body = part[1:-1]
        numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        if numbers:
            lo, hi = numbers.groups()
            step = 1 if int(hi) >= int(lo) else -1
            choices.append([str(n).zfill(len(lo)) for n in range(int(lo), int(hi) + step, step)])
        elif "," in body:
            choices.append(body.split(","))
        else:
            choices.append([part])  # `{x}` alone is no pattern: a literal name
    return ["".join(c) for c in itertools.product(*choices)]


def _with_query(location: str, query: str) -> str:
    return location + (f"?{query}" if query else "")


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    fs, path, _ = filesystem(location)
    return fs, path.rstrip("/")


def shard_files(ds: DatasetConfig) -> list[ShardFile]:
    """The shards `ds.urls` name, in order: each pattern expanded, a folder giving every .tar under it.
    WebDatasetError naming the pattern when a shard is missing or a folder holds none."""
    out = []
    for url in ds.urls_list:
        base, _, query = url.partition("?") if is_uri(url) else (url, "", "")
        shards = [_with_query(s, query) for s in expand_braces(base)]
        try:
            infos = _infos(shards)
        except OSError as e:
            raise WebDatasetError(f"urls: {redacted(url)} cannot be read; {CREDENTIALS_FIX} ({type(e).__name__}: "
                                  f"{str(e).strip()[:180]})") from None
        if len(shards) == 1 and infos[0].type == pafs.FileType.Directory:
            found = _tars_under(shards[0])
            if not found:
                raise WebDatasetError(f"urls: {redacted(url)} is a folder with no .tar file in it")
            out += found
            continue
        missing = [redacted(s) for s, i in zip(shards, infos, strict=True) if i.type != pafs.FileType.File]
        if len(missing) == len(shards):
            raise WebDatasetError(f"urls: {redacted(url)} matches no shard ({', '.join(missing[:3])}"
                                  f"{', ...' if len(missing) > 3 else ''} not found); check the bucket, prefix and "
                                  "the {first..last} range")
        if missing:
            raise WebDatasetError(f"urls: {redacted(url)}: {len(missing)} of {len(shards)} shards not found: "
                                  f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}; fix the range or "
                                  "copy the missing shards")
        out += [ShardFile(redacted(s), s) for s in shards]
    return out


def _infos(locations: list[str]) -> list[pafs.FileInfo]:
    """One stat per shard, in threads (a request each on a store)."""
    def info(location: str) -> pafs.FileInfo:
        fs, path = _fs(location)
        return fs.get_file_info(path)

    with ThreadPoolExecutor(SHARD_THREADS) as pool:
        return list(pool.map(info, locations))


def _tars_under(location: str) -> list[ShardFile]:
    fs, root = _fs(location)
    found = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
                   if i.type == pafs.FileType.File and i.path.endswith(".tar"))
    base, _, query = location.partition("?") if is_uri(location) else (location, "", "")
    # A URI keeps its scheme and query: the path under its root replaces the root.
    located = [_with_query(base.rstrip("/") + p[len(root):], query) if is_uri(location) else p for p in found]
    return [ShardFile(redacted(loc), loc) for loc in located]


class _ReadAhead(io.RawIOBase):
    """A shard read through pyarrow in READ_AHEAD blocks: tarfile reads each 512-byte header and seeks over the
    data, and a read within the last block costs no request."""

    def __init__(self, f, size: int):
        self.f, self.size, self.pos = f, size, 0
        self.start, self.block = 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else min(n, self.size - self.pos)
        if not (self.start <= self.pos and self.pos + n <= self.start + len(self.block)):
            if n > READ_AHEAD:
                data = self.f.read_at(n, self.pos)
                self.pos += len(data)
                return data
            self.start, self.block = self.pos, self.f.read_at(min(READ_AHEAD, self.size - self.pos), self.pos)
        data = self.block[self.pos - self.start:self.pos - self.start + n]
        self.pos += len(data)
        return data


def split_key(name: str) -> tuple[str, str]:
    """(sample key, member key) of a member name, as WebDataset groups them: the base name up to its first dot is
    the sample (its folder kept), the rest the key: `a/000123.seg.png` -> (`a/000123`, `seg.png`)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def index_shard(shard: ShardFile, ds: DatasetConfig) -> tuple[list[Sample], set[str], tuple[int, int]]:
    """The shard's samples that have an image member (in tar order), every member key seen (for the message when
    none is an image) and the shard's (size, mtime_ns). WebDatasetError when it is not a tar archive."""
    fs, path = _fs(shard.location)
    info = fs.get_file_info(path)
    return (*_index(shard.location, ds.image_key, ds.caption_key, ds.caption_strategy == "instanceprompt",
                    info.size, info.mtime_ns), (info.size, info.mtime_ns))


@functools.lru_cache(maxsize=256)
def _index(location: str, image_key: str, caption_key: str, no_captions: bool, size: int,
           mtime_ns: int) -> tuple[list[Sample], set[str]]:
    """index_shard's work, once per shard version and process: the preflight, check and discovery share it."""
    wanted = [k.strip().lower() for k in image_key.split(";") if k.strip()]
    text_key = caption_key.partition(":")[0].strip().lower()
    fs, path = _fs(location)
    images: dict[str, tuple[int, str, int, int]] = {}  # sample -> (rank of its key in `wanted`, member, offset, size)
    texts: dict[str, tuple[str, bytes]] = {}
    seen: set[str] = set()
    with fs.open_input_file(path) as f:
        raw = _ReadAhead(f, size)
        try:
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    sample, ext = split_key(m.name)
                    seen.add(ext)
                    if ext in wanted and (sample not in images or wanted.index(ext) < images[sample][0]):
                        images[sample] = (wanted.index(ext), m.name, m.offset_data, m.size)
                    elif ext == text_key and not no_captions:
                        raw.seek(m.offset_data)
                        texts[sample] = (m.name, raw.read(m.size))
        except tarfile.TarError as e:
            raise WebDatasetError(f"urls: {redacted(location)} is not a tar archive ({e}); a shard is an "
                                  "uncompressed .tar of samples (name.jpg + name.txt, ...)") from None
    return [Sample(member, offset, length, texts.get(sample))
            for sample, (_, member, offset, length) in images.items()], seen


def index_all(ds: DatasetConfig) -> list[tuple[ShardFile, list[Sample], tuple[int, int]]]:
    """Every shard's samples, the shards indexed SHARD_THREADS at once. WebDatasetError for a missing or broken
    shard, or when no sample of any shard has an image_key member."""
    shards = shard_files(ds)
    with ThreadPoolExecutor(SHARD_THREADS) as pool:
        indexed = list(pool.map(lambda s: index_shard(s, ds), shards))
    if not any(samples for samples, _, _ in indexed):
        seen = sorted(set().union(*(keys for _, keys, _ in indexed)) - {""})
        raise WebDatasetError(f"image_key {ds.image_key}: no sample in {len(shards)} shard(s) has such a member; "
                              f"their members are {', '.join(seen) or 'none'} (set image_key to one of them, "
                              "several as jpg;png)")
    return [(shard, samples, stat) for shard, (samples, _, stat) in zip(shards, indexed, strict=True)]


def member_path(shard: ShardFile, sample: Sample) -> str:
    return f"{shard.name}{MEMBER}{sample.member}{OFFSET}{sample.offset}{SIZE}{sample.size}"


def split_member(path: str) -> tuple[str, str, int, int] | None:
    """(shard name, member name, offset, size) of a tar member's name, or None for any other path."""
    rest, sep, size = path.rpartition(SIZE)
    rest, sep2, offset = rest.rpartition(OFFSET)
    shard, sep3, member = rest.rpartition(MEMBER)
    if not (sep and sep2 and sep3 and size.isdigit() and offset.isdigit()):
        return None
    return shard, member, int(offset), int(size)


def member_name(path: str) -> str:
    """How a member is shown: `<shard>#member=<name>`, without its offset and size."""
    found = split_member(path)
    return f"{found[0]}{MEMBER}{found[1]}" if found else path


def read_member(shard: ShardFile, offset: int, size: int) -> bytes:
    """The member's bytes: one ranged read of the shard."""
    fs, path = _fs(shard.location)
    with fs.open_input_file(path) as f:
        data = f.read_at(size, offset)
    if len(data) != size:
        raise OSError(f"{shard.name} ends before its member at {offset} (+{size}): the shard changed; run again")
    return data


def webdataset_problem(ds: DatasetConfig) -> str | None:
    """Why a webdataset cannot be used (a pattern matching no shard, a missing shard, a shard that is not a tar, no
    image_key member in any sample, a store that cannot be read), or None. Indexes every shard (kept for
    discovery)."""
    try:
        index_all(ds)
    except (WebDatasetError, OSError) as e:
        return str(e)
    return None


def shard_sources(datasets: list[DatasetConfig]) -> dict[str, ShardFile]:
    """{shard name: ShardFile} of the webdataset data sets: what the caching tasks need to read their members."""
    return {s.name: s for ds in datasets if ds.type == "webdataset" for s in shard_files(ds)}
