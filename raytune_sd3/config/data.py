"""The images a job trains on (`data:`): each data set (`data.datasets[]`: where its images and captions come from,
the sizes and crops it is trained at) and what all of them share (the cache, the held-out eval items, buckets)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from raytune_sd3.config.section import FileOrUri, FolderOrUri, Resolution, Section, not_a_file, path_text


class DatasetConfig(Section):
    id: str
    """A short name for this data set (used in cache reports and errors)."""
    type: Literal["local", "demo", "parquet", "huggingface", "webdataset"] = "local"
    """`local`: images in instance_data_dir; `demo`: coloured shapes generated into instance_data_dir on first use;
    `parquet`: rows of Parquet files (`path`, `image_column`, `caption_column`); `huggingface`: a Hugging Face data
    set already on this machine (`dataset`, `split`, the same columns); `webdataset`: samples of tar shards (`urls`,
    `image_key`, `caption_key`)."""
    instance_data_dir: FolderOrUri | None = None
    """Folder of images (searched recursively): a local or mounted path, or a URI of a folder in object storage
    (`s3://bucket/prefix`, `gs://...`; options in its query as for data.cache_dir, e.g.
    `?endpoint_override=host:9000&scheme=http`; credentials from the environment). A URI is read where it is used:
    the caching tasks read the images from the store, no node needs a copy."""
    caption_strategy: Literal["textfile", "filename", "instanceprompt", "metadata"] = "textfile"
    """Where captions come from: a .txt beside each image (one caption per line, one drawn per epoch; no .txt: the
    file name), the file name, instance_prompt for every image, or metadata_file."""
    metadata_file: FileOrUri | None = None
    """caption_strategy metadata: a .jsonl, .csv or .parquet file with a file_name column (relative to
    instance_data_dir) and a caption column (a string, or a list of captions in JSONL/parquet); a URI when the
    images are in a store (the same query options)."""
    instance_prompt: str | None = None
    """The caption of every image when caption_strategy is instanceprompt."""
    resolution: Resolution | list[Resolution] = 1024
    """Training size in pixels, in the unit of resolution_type (1024: about 1024x1024 pixels of area; 16 to
    MAX_RESOLUTION 8192); a list (e.g. [512, 1024]) trains on every image at each of them (multi-resolution)."""
    resolution_type: Literal["pixel_area", "pixel"] = "pixel_area"
    """pixel_area: resolution R means about R*R pixels of area, each side a multiple of data.bucket_alignment
    (SimpleTuner's SD3 default); pixel: the shorter side is R."""
    crop: bool = False
    """false: each image keeps its aspect ratio (aspect buckets), resized to cover its bucket; true: a window of
    crop_aspect is cut at crop_style from the image at its own scale (downsampled first when maximum_image_size
    and target_downsample_size are set; enlarged only when smaller than the window), as SimpleTuner."""
    crop_style: Literal["center", "centre", "corner", "random"] = "center"
    """Where the window (or the rounding trim) sits: center, corner (top-left) or random (seeded by the image's
    bytes: the same on every run)."""
    crop_aspect: Literal["square", "preserve", "closest", "random"] = "square"
    """With crop: the window's aspect ratio: square, the image's own (preserve), the closest of
    crop_aspect_buckets, or a random one of them (seeded by the image)."""
    crop_aspect_buckets: list[float] | None = None
    """Aspect ratios (width/height) for crop_aspect closest or random, e.g. [0.75, 1.0, 1.33]."""
    minimum_image_size: int | None = Field(None, ge=1)
    """Skip (and report) images smaller than this, in the unit of resolution_type (pixel: the shorter side;
    pixel_area: the square root of the area); default: use every size."""
    maximum_image_size: int | None = Field(None, ge=1)
    """Images larger than this (same unit) are first downsampled to target_downsample_size; set both or neither."""
    target_downsample_size: int | None = Field(None, ge=1)
    """The size (same unit) that images above maximum_image_size are downsampled to before the crop."""
    repeats: int = Field(0, ge=0)
    """Extra times each image is seen per epoch (SimpleTuner's meaning: 0 = once, 1 = twice); weights a small
    data set against a large one."""
    is_regularisation_data: bool = False
    """A regularisation (prior-preservation) set: its samples' loss is multiplied by train.prior_loss_weight."""
    mask_suffix: str | None = None
    """Masked loss: each image NAME.ext has a mask NAME<mask_suffix>.(png|jpg|...) beside it (white = learn, black
    = ignore, grey = partial); the loss is weighted by it in latent space. Mask files are not training images;
    an image without its mask is skipped and reported."""
    demo_images: int = Field(48, ge=1)
    """How many images a demo data set generates."""
    path: FileOrUri | None = None
    """type parquet: a .parquet file or a folder of them (searched recursively), local or a URI (s3://...)."""
    dataset: str | None = None
    """type huggingface: a folder written by `datasets`' save_to_disk, a folder of Parquet files (a hub data set's
    layout: data/train-00000-of-00002.parquet ...), or a hub id (owner/name) already in the local HF cache (never
    downloaded at run time: `hf download --repo-type dataset owner/name` first)."""
    split: str = "train"
    """type huggingface: the split to train on (a save_to_disk DatasetDict's folder, or the Parquet files whose
    names start with it)."""
    image_column: str = "image"
    """type parquet / huggingface: the column of encoded image bytes (binary, or a Hugging Face Image feature:
    a struct with `bytes`)."""
    caption_column: str | None = "caption"
    """type parquet / huggingface: the column of captions (a string, or a list of strings: one drawn per epoch);
    null with caption_strategy instanceprompt."""
    filter: str | None = None
    """type parquet / huggingface: rows to keep, a comparison of columns and values joined by and / or / not, e.g.
    `width >= 512 and source == "web"` or `label in [1, 2]`."""
    urls: Annotated[str, BeforeValidator(path_text)] | list[Annotated[str, BeforeValidator(path_text)]] | None = None
    """type webdataset: the tar shards, local or in object storage (s3://, gs://; options in the query as for
    instance_data_dir), one or a list; brace patterns name many (`s3://bucket/shards/data-{000..099}.tar`,
    `{train,extra}-0.tar`), and a folder means every .tar under it. Every shard named must exist."""
    image_key: str = "jpg;jpeg;png;webp"
    """type webdataset: the member holding a sample's image, by its extension (`000123.jpg`: jpg); alternatives
    separated by `;`, the first found used."""
    caption_key: str = "txt"
    """type webdataset: the member holding a sample's caption: `txt` (its lines, one drawn per epoch), or
    `json:FIELD` for a field of the .json member (a string or a list of strings), e.g. `json:caption`."""

    @field_validator("resolution")
    @classmethod
    def _resolutions(cls, v: int | list[int]) -> int | list[int]:
        values = v if isinstance(v, list) else [v]
        if not values or any(r < 16 for r in values) or len(set(values)) != len(values):
            raise ValueError(f"resolution is a size of at least 16, or a list of different sizes, got {v}")
        return v

    @property
    def resolutions(self) -> list[int]:
        return self.resolution if isinstance(self.resolution, list) else [self.resolution]

    @property
    def max_resolution(self) -> int:
        return max(self.resolutions)

    @property
    def urls_list(self) -> list[str]:
        """type webdataset: `urls` as a list (one pattern given alone is a list of one)."""
        return [self.urls] if isinstance(self.urls, str) else list(self.urls or [])

    @property
    def in_store(self) -> bool:
        """Whether instance_data_dir is a URI (object storage) rather than a local folder."""
        return isinstance(self.instance_data_dir, str)

    @model_validator(mode="after")
    def _prompt_when_needed(self) -> DatasetConfig:
        rows = self.type in ("parquet", "huggingface", "webdataset")  # images named by a source, not a folder
        if not rows and self.instance_data_dir is None:
            raise ValueError(f"type {self.type} needs instance_data_dir (the folder of its images)")
        if rows and self.instance_data_dir is not None:
            source = {"parquet": "rows: give path", "huggingface": "rows: give dataset"}.get(self.type, "shards: give urls")
            raise ValueError(f"type {self.type} reads its images from its {source} and remove instance_data_dir")
        if (self.type == "webdataset") != (self.urls is not None):
            raise ValueError("urls are the tar shards of type webdataset: set them there, and only there")
        if self.type == "webdataset" and not self.urls_list:
            raise ValueError("type webdataset needs at least one shard in urls")
        if self.type == "webdataset" and not [k for k in self.image_key.split(";") if k.strip()]:
            raise ValueError("image_key names the image member by its extension, e.g. jpg or jpg;png")
        if (self.type == "parquet") != (self.path is not None):
            raise ValueError("path is the Parquet file or folder of type parquet: set it there, and only there")
        if (self.type == "huggingface") != (self.dataset is not None):
            raise ValueError("dataset is the Hugging Face data set of type huggingface: set it there, and only there")
        if rows and self.caption_strategy not in ("textfile", "instanceprompt"):
            raise ValueError(f"type {self.type}: captions come from "
                             f"{'caption_key' if self.type == 'webdataset' else 'caption_column'} (or instance_prompt "
                             "with caption_strategy instanceprompt), not from files")
        if self.type in ("parquet", "huggingface") and self.caption_strategy != "instanceprompt" and \
                not self.caption_column:
            raise ValueError(f"type {self.type} needs caption_column (or caption_strategy instanceprompt)")
        if rows and self.mask_suffix:
            raise ValueError(f"type {self.type}: masks are read from files beside images; use type local for "
                             "masked loss")
        if self.filter is not None and self.type not in ("parquet", "huggingface"):
            raise ValueError("filter selects rows of type parquet or huggingface data sets")
        if self.filter is not None:
            import ast

            try:
                ast.parse(self.filter, mode="eval")
            except SyntaxError as e:
                raise ValueError(f"filter {self.filter!r} is not an expression ({e.msg}); e.g. width >= 512 and "
                                 'source == "web"') from None
        if self.type == "demo" and self.in_store:
            raise ValueError("type demo generates its images into a local folder: give instance_data_dir as a path "
                             "(or use type local for images already in the store)")
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ValueError("caption_strategy 'instanceprompt' needs instance_prompt set")
        if self.caption_strategy == "metadata" and self.metadata_file is None:
            raise ValueError("caption_strategy 'metadata' needs metadata_file set (a .jsonl, .csv or .parquet file)")
        if (self.maximum_image_size is None) != (self.target_downsample_size is None):
            raise ValueError("maximum_image_size and target_downsample_size work together: set both or neither")
        if self.crop and self.crop_aspect in ("closest", "random") and not self.crop_aspect_buckets:
            raise ValueError(f"crop_aspect '{self.crop_aspect}' needs crop_aspect_buckets, e.g. [0.75, 1.0, 1.33]")
        if any(b <= 0 for b in self.crop_aspect_buckets or ()):
            raise ValueError(f"crop_aspect_buckets are width/height ratios above 0, got {self.crop_aspect_buckets}")
        if self.mask_suffix is not None and not self.mask_suffix.strip():
            raise ValueError("mask_suffix must not be empty (e.g. _mask)")
        return self


class DataConfig(Section):
    datasets: list[DatasetConfig] = Field(min_length=1)
    """The data sets of this job."""
    cache_dir: Annotated[str, BeforeValidator(path_text), AfterValidator(not_a_file)] | None = None
    """Where encoded latents and text embeddings live; default `<output_dir>/cache`. Reused by later runs. On a
    cluster: a folder every node mounts, or a URI (`s3://bucket/cache`, `gs://...`; options in its query, e.g.
    `?endpoint_override=host:9000&scheme=http` for MinIO; credentials from the environment)."""
    caption_dropout: float = Field(0.0, ge=0.0, le=1.0)
    """Probability that a training sample uses the unconditional embedding instead of its caption."""
    eval_samples: int = Field(4, ge=0)
    """Items held out of training for the eval loss (fixed sigmas, fixed noise)."""
    max_image_pixels: int = Field(250_000_000, ge=1)
    """Images with more pixels are skipped and reported before decoding (a guard against decompression bombs)."""
    encode_batch_size: int = Field(8, ge=1)
    """Images (or captions) per batch in the encoding actors."""
    encode_actors: int | None = Field(None, ge=1)
    """Encoding actors per encoder; default 1 per GPU, or 1 per 8 logical CPUs on a CPU-only cluster."""
    bucket_alignment: int = Field(64, ge=16)
    """Every bucket side is a multiple of this (SimpleTuner's aspect_bucket_alignment; 64 for SD3)."""
    memory_cache_gb: float = Field(2.0, ge=0)
    """GiB of cache entries each training worker keeps decoded in RAM after their first read (0: read every batch
    from the cache). A data set that fits is read from the cache once per run; beyond the budget, entries are read
    each time they are used."""
    random_flip: bool = False
    """Horizontal flips: each training image is also cached mirrored (its own cache entry, encoded once), and each
    time an image is drawn for a step it is the mirrored one with probability 1/2 (drawn from train.seed and its
    place in the run, so a resumed run draws the same). The eval set is never flipped. Costs one more latent per
    image in the cache. Not for images whose left and right matter (text, asymmetric subjects)."""
    small_buckets: Literal["error", "oversubscribe", "drop"] = "error"
    """A bucket with fewer images than one global batch (batch_size x grad_accum x workers; every optimizer step
    uses one bucket): error (default, names each such bucket), oversubscribe (repeat its images to fill a batch)
    or drop (train without them; they are listed in the log)."""

    @field_validator("bucket_alignment")
    @classmethod
    def _alignment(cls, v: int) -> int:
        if v % 16:  # VAE /8 then the transformer's 2x2 patches
            raise ValueError(f"must be a multiple of 16 (VAE /8 x patch 2), got {v}; try {round(v / 16) * 16 or 16}")
        return v
