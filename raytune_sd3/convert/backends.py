"""SimpleTuner's storage types for a data set -> ours: `type: aws` becomes an s3:// instance_data_dir,
`type: huggingface` a data set read from the local HF cache, `type: webshart` WebDataset shards (type webdataset).
A local folder needs no translation; anything else is refused by convert_dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from raytune_sd3.config import is_uri
from raytune_sd3.convert.report import Conversion, Never
from raytune_sd3.convert.rules import fmt
from raytune_sd3.data.files import redacted


def from_aws(entry: dict[str, Any], where: str, conv: Conversion) -> dict[str, Any]:
    """SimpleTuner's `type: aws` keys -> our instance_data_dir URI (s3://bucket/prefix, the endpoint and region in
    its query); its credentials were dropped with a note (the environment gives them)."""
    bucket = str(entry.pop("aws_bucket_name", "") or "")
    if not bucket:
        raise Never(f"[{entry['id']}] type aws has no aws_bucket_name: set the bucket of its images")
    prefix = str(entry.pop("aws_data_prefix", "") or "").strip("/")
    query = []
    endpoint = str(entry.pop("aws_endpoint_url", "") or "")
    if endpoint:
        parts = urlsplit(endpoint)
        query += [f"endpoint_override={parts.netloc or parts.path}", f"scheme={parts.scheme or 'https'}"]
    region = entry.pop("aws_region_name", None)
    if region:
        query.append(f"region={region}")
    conv.defaults.append(f"{where}type aws -> instance_data_dir s3://{bucket}/{prefix} (read from the bucket by the "
                         "caching tasks; credentials from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)")
    return {**entry, "type": "local",
            "instance_data_dir": f"s3://{bucket}/{prefix}".rstrip("/") + (f"?{'&'.join(query)}" if query else "")}


def from_huggingface(entry: dict[str, Any], where: str, conv: Conversion) -> dict[str, Any]:
    """SimpleTuner's `type: huggingface` keys -> our type huggingface (a data set in the local HF cache: never
    downloaded at run time)."""
    name = entry.pop("dataset_name", None)
    if not name:
        raise Never(f"[{entry['id']}] type huggingface has no dataset_name: set the hub id (owner/name)")
    if entry.get("caption_strategy", "huggingface") in ("huggingface", "filename", "textfile"):
        entry["caption_strategy"] = "textfile"  # ours, for a table: caption_column
    entry.pop("metadata_backend", None)
    if entry.pop("revision", None):
        conv.not_converted.append(f"{where}revision (the data set's snapshot in the local HF cache is read: download "
                                  "the revision you want with hf download --repo-type dataset --revision)")
    conv.defaults.append(f"{where}type huggingface -> dataset {name} (read from the local HF cache, never "
                         f"downloaded at run time: hf download --repo-type dataset {name} first)")
    return {**entry, "dataset": str(name)}


WEBSHART_LOADER = ("cache_dir", "metadata_cache_dir", "shard_cache_dir", "shard_cache_gb", "parallel_downloads",
                   "buffer_size", "max_file_size", "optimize_captions", "optimise_captions")


def from_webshart(entry: dict[str, Any], where: str, conv: Conversion) -> dict[str, Any]:
    """SimpleTuner's `type: webshart` (WebDataset tar shards read through the webshart package, from a folder or a
    hub data set it downloads) -> our type webdataset: the shards' folder (or URI) becomes `urls`, every .tar under
    it; captions from each sample's .txt member. A hub data set is downloaded first, never at run time."""
    block = dict(entry.pop("webshart", None) or {})
    if block.pop("hf_token", None) is not None:
        conv.secrets.append(f"{where}webshart.hf_token (a credential is never copied into a job file)")
    shards = entry.pop("source", None) or block.pop("source", None)
    subfolder = entry.pop("subfolder", None) or block.pop("subfolder", None)
    if not shards:
        raise Never(f"[{entry['id']}] type webshart has no source: set the folder of its tar shards")
    shards = str(shards)
    if not (is_uri(shards) or shards.startswith(("/", ".", "~")) or Path(shards).expanduser().exists()):
        raise Never(f"[{entry['id']}] type webshart source {shards} is a hub data set, which webshart downloads while "
                    f"training: download its shards first (hf download --repo-type dataset {shards} --local-dir "
                    "DIR) and set source to DIR (or copy them to a bucket)")
    urls = shards.rstrip("/") + (f"/{str(subfolder).strip('/')}" if subfolder else "")
    metadata = entry.pop("metadata", None) or block.pop("metadata", None)
    if metadata:
        conv.not_converted.append(f"{where}metadata = {fmt(metadata)} (webshart's JSON index: sizes and captions "
                                  "are read from the shards here, captions from each sample's .txt member)")
    for key in WEBSHART_LOADER:
        for value, label in ((entry.pop(key, None), key), (block.pop(key, None), f"webshart.{key}")):
            if value is not None:
                conv.ignored.append(f"{where}{label} = {fmt(value)} (webshart's download and cache settings: "
                                    "shards are read where they are, each image by one ranged read)")
    for key, value in block.items():
        conv.not_converted.append(f"{where}webshart.{key} = {fmt(value)} (no equivalent in raytune_sd3)")
    if entry.get("caption_strategy", "webshart") == "webshart":
        entry["caption_strategy"] = "textfile"  # ours, for shards: caption_key txt
    entry.pop("metadata_backend", None)
    conv.defaults.append(f"{where}type webshart -> type webdataset, urls {redacted(urls)} (every .tar under it, read "
                         "in place; captions from each sample's .txt member: caption_key txt)")
    return {**entry, "type": "webdataset", "urls": urls}
