"""What every section of the job shares: the `Section` base (unknown keys refused, finite floats, a docstring per
field) and the types its fields are written in (paths, URIs, sizes), with the limits behind them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from raytune_sd3.config.secrets import show

# An upper bound on image sizes, so a typo (10**30) is refused at the door instead of overflowing in pyarrow or
# "fitting" in 1e25 GiB. Far above what SD3 trains at (1024-2048 px).
MAX_RESOLUTION = 8192
NAME_MAX = 255  # bytes in one file or folder name (ext4, xfs, APFS, NTFS)


class Section(BaseModel):
    # allow_inf_nan=False: every float is finite (.nan or .inf in a learning rate, shift or guidance scale is a
    # mistake); the few keys where .inf means "never" say so and opt back in (train.divergence_factor,
    # train.grad_norm_limit; NaN stays refused there by their bounds).
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              allow_inf_nan=False)


def path_text(v: Any) -> Any:
    """A path (or URI) as written: not empty (that would be the working directory), no NUL byte, no name longer
    than a filesystem allows."""
    if isinstance(v, str | Path):
        text = str(v)
        if not text.strip():
            raise ValueError("is empty, which would mean the working directory; give the path")
        if "\x00" in text:
            raise ValueError("contains a NUL byte, which no path can hold")
        longest = max(len(part.encode("utf-8", "replace")) for part in text.split("/"))
        if longest > NAME_MAX and not is_uri(text):
            raise ValueError(f"has a name of {longest:,} bytes; a file or folder name is at most {NAME_MAX} bytes")
    return v


def not_a_file(v: Any) -> Any:
    """A folder (or a URI, or a path not yet made) as written; an existing file is refused."""
    if isinstance(v, str | Path) and not is_uri(str(v)) and Path(v).expanduser().is_file():
        raise ValueError(f"{show(str(v))} is a file; this must be a folder (or a new path)")
    return v


PathText = Annotated[Path, BeforeValidator(path_text)]
"""A file's path."""


def _path_or_uri(v: Any) -> Any:
    """A URI stays the text it was written as (a Path would fold its // into a relative folder); else a Path."""
    if not isinstance(v, str | Path):
        raise ValueError(f"is a path or a URI, not {type(v).__name__}")
    v = path_text(v)
    return v if isinstance(v, str) and is_uri(v) else Path(v)


FolderOrUri = Annotated[Path | str, BeforeValidator(lambda v: not_a_file(_path_or_uri(v)))]
"""A folder's path, or the URI of a folder in object storage (s3://bucket/prefix?endpoint_override=...)."""
FileOrUri = Annotated[Path | str, BeforeValidator(_path_or_uri)]
"""A file's path, or its URI."""
FolderPath = Annotated[Path, BeforeValidator(path_text), AfterValidator(not_a_file)]
"""A folder's path: an existing file is refused (writing or searching it would fail later, deep in a worker)."""
Resolution = Annotated[int, Field(ge=16, le=MAX_RESOLUTION)]


def is_uri(location: str) -> bool:
    """True for `scheme://...` other than file://, which is a local path (a cache or storage location)."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and "://" in str(location) and scheme != "file"
