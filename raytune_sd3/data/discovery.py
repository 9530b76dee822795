"""Finding the images of a data set and their captions; what cannot be used is listed with the reason, not fatal.

Caption sources (caption_strategy): a .txt beside each image (several lines = several captions, one drawn per
epoch), the file name, one instance prompt, or a metadata file (JSONL, CSV or parquet: file name -> caption or
list of captions). The folder is local (an image is named by its absolute path) or in a store (named by its URI
without query or credentials; data/sources.py): the rules are the same.
"""

from __future__ import annotations

import csv
import io
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from raytune_sd3.config import DatasetConfig, is_uri
from raytune_sd3.data.buckets import sizings_of
from raytune_sd3.data.files import filesystem, redacted
from raytune_sd3.data.sources import CREDENTIALS_FIX, DataFolder
from raytune_sd3.data.tables import ROW, rows_of
from raytune_sd3.data.webdataset import index_all, member_path

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
    stat: tuple[int, int] | None = None
    """(size, mtime_ns) of an object in a store as its listing gave them (the stat index's key; a local file is
    stat'ed when needed)."""
    mask_stat: tuple[int, int] | None = None

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
    return parse_captions(txt.read_bytes(), txt.name)


def parse_captions(data: bytes, name: str) -> list[str]:
    """The captions in a caption file's bytes (see read_caption_file); `name` is for the message."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CaptionError(f"caption file {name} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from None
    captions = [line.strip() for line in text.splitlines() if line.strip()]
    if not captions:
        raise CaptionError(f"caption file {name} is empty; write a caption or delete it to use the file name")
    return captions


def _column(names: list[str], wanted: tuple[str, ...], source: Path) -> str:
    found = next((n for n in wanted if n in names), None)
    if found is None:
        raise ValueError(f"{source}: needs a column named one of {', '.join(wanted)}; it has {', '.join(names)}")
    return found


def _records(data: bytes, suffix: str) -> list:
    if suffix in (".jsonl", ".json"):
        return [json.loads(line) for line in data.decode("utf-8-sig").splitlines() if line.strip()]
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"), newline="")))
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(data)).to_pylist()


def _metadata_bytes(path: Path | str) -> bytes:
    """The metadata file's bytes, from a local path or a URI; ValueError when there is no such file."""
    if not is_uri(str(path)):
        if not Path(path).is_file():
            raise ValueError(f"metadata_file {path} does not exist")
        return Path(path).read_bytes()
    import pyarrow.fs as pafs

    try:
        fs, fs_path, _ = filesystem(str(path))
        if fs.get_file_info(fs_path).type != pafs.FileType.File:
            raise ValueError(f"metadata_file {redacted(str(path))} does not exist")
        with fs.open_input_file(fs_path) as f:
            return f.readall()
    except OSError as e:  # the client's status runs to many lines: the file, the fix and its first line
        raise ValueError(f"metadata_file {redacted(str(path))} cannot be read; {CREDENTIALS_FIX} "
                         f"({type(e).__name__}: {str(e).strip()[:180]})") from None


def read_metadata(path: Path | str, root: Path | str) -> dict[str, list[str]]:
    """{image name: captions} from a JSONL, CSV or parquet file (a path or a URI); its file names are relative to
    the data folder `root`. An image's name is its absolute path under a local `root` (a Path), or the store
    folder's name (a str, data/sources.py) joined with the file name."""
    shown = redacted(str(path))
    suffix = PurePosixPath(shown).suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise ValueError(f"metadata_file {shown}: use a .jsonl, .csv or .parquet file")
    data = _metadata_bytes(path)
    path = Path(PurePosixPath(shown).name) if is_uri(str(path)) else Path(path)  # named in messages from here
    try:
        records = _records(data, suffix)
    except (csv.Error, RecursionError, UnicodeDecodeError, OSError) as e:  # csv's field limit, deep JSON, ...
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
        name = (str((root / str(r[key])).resolve()) if isinstance(root, Path)
                else f"{root}/{posixpath.normpath(str(r[key])).lstrip('/')}")
        out[name] = [c.strip() for c in captions if c and c.strip()]
    return out


def find_mask(image: Path, suffix: str) -> Path | None:
    """The mask file beside `image` (NAME<suffix> with any image extension), or None."""
    found = [image.with_name(image.stem + suffix + ext) for ext in sorted(IMAGE_EXTS)]
    return next((m for m in found if m.is_file()), None)


def discover(ds: DatasetConfig, alignment: int = 64) -> tuple[list[Item], list[dict]]:
    """Every image under ds.instance_data_dir (recursive, sorted) with its captions, one Item per resolution, and
    the files skipped (with the reason) because they have no usable caption or no mask. A folder in a store is
    listed (data/sources.py) and its caption files read in threads; no image is opened here. A caller that must
    answer soon bounds how long a store is retried with data.files.stores_retried_for."""
    if ds.type in ("parquet", "huggingface"):
        return _discover_rows(ds, alignment)
    if ds.type == "webdataset":
        return _discover_shards(ds, alignment)
    if ds.in_store:
        return _discover_in_store(ds, alignment)
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

    def caption_file(image: str) -> tuple[bytes, str] | None:
        txt = Path(image).with_suffix(".txt")
        return (txt.read_bytes(), txt.name) if txt.is_file() else None

    def mask(image: str) -> str:
        found = find_mask(Path(image), ds.mask_suffix)
        return str(found.resolve()) if found else ""

    images = [str(p.resolve() if p.is_symlink() else p) for p in files]
    return _items(ds, alignment, images, str(given), metadata, caption_file, mask, {})


def _discover_in_store(ds: DatasetConfig, alignment: int) -> tuple[list[Item], list[dict]]:
    folder = DataFolder(str(ds.instance_data_dir))
    listed = {folder.name_of(i.path): (i.size, i.mtime_ns) for i in folder.listing()}
    images = sorted(n for n in listed if suffix_of(n).lower() in IMAGE_EXTS
                    and not (ds.mask_suffix and stem_of(n).endswith(ds.mask_suffix)))
    if not images:
        raise ValueError(f"data set '{ds.id}': no images ({', '.join(sorted(IMAGE_EXTS))}) under {folder.name}")
    metadata = read_metadata(ds.metadata_file, folder.name) if ds.caption_strategy == "metadata" else {}
    texts = {}
    if ds.caption_strategy == "textfile":
        names = [t for n in images if (t := _with_suffix(n, ".txt")) in listed]
        texts = dict(zip(names, folder.read_many(names), strict=True))

    def caption_file(image: str) -> tuple[bytes, str] | None:
        txt = _with_suffix(image, ".txt")
        return (texts[txt], name_of(txt)) if txt in texts else None

    def mask(image: str) -> str:
        stem = _with_suffix(image, "")  # string work: a PurePosixPath would fold the URI's //
        return next((m for ext in sorted(IMAGE_EXTS) if (m := f"{stem}{ds.mask_suffix}{ext}") in listed), "")

    return _items(ds, alignment, images, folder.name, metadata, caption_file, mask, listed)


def _discover_rows(ds: DatasetConfig, alignment: int) -> tuple[list[Item], list[dict]]:
    """The kept rows of a table data set (data/tables.py), each named `<file>#row=<n>`; only its caption and filter
    columns are read here. A row without a caption is skipped."""
    sizings = [s.to_json() for s in sizings_of(ds, alignment)]
    items, skipped = [], []
    for table_file, keep, captions in rows_of(ds):
        for row, found in zip(keep, captions, strict=True):
            path = f"{table_file.name}{ROW}{row}"
            if not found:
                skipped.append({"path": path, "reason": f"no caption in column {ds.caption_column}"})
                continue
            items += [Item(path, found[0], ds.id, sizing, tuple(found[1:]), "", ds.is_regularisation_data,
                           ds.repeats) for sizing in sizings]
    if not items and not skipped:
        raise ValueError(f"data set '{ds.id}': no rows" + (f" left by filter {ds.filter!r}" if ds.filter else ""))
    return items, skipped


def _discover_shards(ds: DatasetConfig, alignment: int) -> tuple[list[Item], list[dict]]:
    """The samples of a webdataset's shards (data/webdataset.py), each named by its image member; only the tar
    headers and the caption members are read here. A sample without a usable caption is skipped. Its stat is
    (the member's size, the shard's mtime): a rewritten shard is read again."""
    sizings = [s.to_json() for s in sizings_of(ds, alignment)]
    items, skipped = [], []
    key, _, field = ds.caption_key.partition(":")
    for shard, samples, (_, shard_mtime) in index_all(ds):
        for sample in samples:
            path = member_path(shard, sample)
            try:
                captions = ([ds.instance_prompt or ""] if ds.caption_strategy == "instanceprompt"
                            else _member_captions(sample.caption, key, field.strip() or None))
            except CaptionError as e:
                skipped.append({"path": path, "reason": str(e)})
                continue
            items += [Item(path, captions[0], ds.id, sizing, tuple(captions[1:]), "", ds.is_regularisation_data,
                           ds.repeats, (sample.size, shard_mtime)) for sizing in sizings]
    return items, skipped


def _member_captions(member: tuple[str, bytes] | None, key: str, field: str | None) -> list[str]:
    """The captions of a sample's caption member (name, bytes): its lines, or its JSON `field` (a string or a list
    of strings); CaptionError when it has none."""
    if member is None:
        raise CaptionError(f"no .{key} member (caption_key) in its sample")
    name, data = member
    if field is None:
        return parse_captions(data, name)
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CaptionError(f"{name} is not JSON ({type(e).__name__}); caption_key json:{field} reads a field of "
                           "it") from None
    value = value.get(field) if isinstance(value, dict) else None
    values = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    found = [v.strip() for v in values if isinstance(v, str) and v.strip()]
    if not found:
        raise CaptionError(f"{name} has no caption in its field {field!r}")
    return found


def _with_suffix(name: str, suffix: str) -> str:
    return name[:len(name) - len(suffix_of(name))] + suffix


# A name's last part, its stem and suffix, as PurePosixPath gives them, by string work: discovery asks them of
# every listed object, and building a PurePosixPath cost more than the rest of an object's discovery (~15 us).
def name_of(path: str) -> str:
    return path[path.rfind("/") + 1:]


def suffix_of(path: str) -> str:
    name = name_of(path)
    dot = name.rfind(".")
    return name[dot:] if 0 < dot < len(name) - 1 else ""


def stem_of(path: str) -> str:
    name = name_of(path)
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name


def _items(ds: DatasetConfig, alignment: int, images: list[str], given: str, metadata: dict[str, list[str]],
           caption_file: Callable[[str], tuple[bytes, str] | None], mask_of: Callable[[str], str],
           listed: dict[str, tuple[int, int]]) -> tuple[list[Item], list[dict]]:
    """The Items of `images` (sorted names) and the skipped ones; `caption_file(image)` is the (bytes, name) of its
    .txt or None, `mask_of(image)` its mask's name or "", `listed` the stats a store's listing gave."""
    sizings = [s.to_json() for s in sizings_of(ds, alignment)]
    items, skipped = [], []
    for path in images:
        try:
            captions = _captions(path, ds, metadata, caption_file)
        except CaptionError as e:
            skipped.append({"path": path, "reason": str(e)})
            continue
        mask = mask_of(path) if ds.mask_suffix else ""
        if ds.mask_suffix and not mask:
            skipped.append({"path": path, "reason": f"no mask {PurePosixPath(path).stem}{ds.mask_suffix}.png (or "
                                                    f"another image extension) beside it; data set '{ds.id}' has "
                                                    "mask_suffix set"})
            continue
        items += [Item(path, captions[0], ds.id, sizing, tuple(captions[1:]), mask, ds.is_regularisation_data,
                       ds.repeats, listed.get(path), listed.get(mask)) for sizing in sizings]
    if metadata:
        found = {it.path for it in items} | {s["path"] for s in skipped}
        named = PurePosixPath(redacted(str(ds.metadata_file))).name
        skipped += [{"path": m, "reason": f"listed in {named} but not an image under {given}"}
                    for m in sorted(set(metadata) - found)]
    return items, skipped


def _captions(path: str, ds: DatasetConfig, metadata: dict[str, list[str]],
              caption_file: Callable[[str], tuple[bytes, str] | None]) -> list[str]:
    if ds.caption_strategy == "instanceprompt":
        return [ds.instance_prompt or ""]
    if ds.caption_strategy == "metadata":
        if metadata.get(path):
            return metadata[path]
        named = name_of(redacted(str(ds.metadata_file)))
        raise CaptionError(f"{'empty caption' if path in metadata else 'no row'} for {name_of(path)} in {named}")
    if ds.caption_strategy == "textfile" and (found := caption_file(path)) is not None:
        return parse_captions(*found)
    return [stem_of(path).replace("_", " ").strip()]  # underscores only, as SimpleTuner: "t-shirt" stays a word
