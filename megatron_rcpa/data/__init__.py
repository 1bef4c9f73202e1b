"""RCPA data: samples, readers (JSONL / parquet / HF ``save_to_disk`` and hub-style directories; plain, verl and
TRL row schemas), image pixel limits (Qwen2-VL's ``smart_resize``), a resumable DP-sharded prompt sampler and
synthetic verifiable domains (counting, geometry). A sample's prompt format is its model family's
(:class:`megatron_rcpa.models.families.PromptFormat`)."""

from .image_size import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, smart_resize
from .readers import (
    FORMATS,
    REFERENCE_FIELDS,
    DataFileError,
    ImageSource,
    ReaderConfig,
    SampleDataset,
    SampleLoadError,
    detect_format,
    fit_image,
    get_field,
    hf_disk_files,
    hub_dir_files,
    image_to_png_bytes,
    load_image,
    load_samples,
    samples_from_rows,
)
from .sample import SKIP_REASONS, DataStats, Sample
from .sampler import PromptSampler
from .synthetic import (
    GEOMETRY_TASKS,
    SYNTHETIC_KINDS,
    make_synthetic_dataset,
    make_synthetic_sample,
    write_synthetic_jsonl,
)

__all__ = [
    "FORMATS",
    "DataFileError", "ImageSource", "ReaderConfig", "SampleDataset", "SampleLoadError", "detect_format",
    "hf_disk_files", "hub_dir_files", "get_field", "fit_image", "REFERENCE_FIELDS", "smart_resize",
    "DEFAULT_MIN_PIXELS", "DEFAULT_MAX_PIXELS",
    "image_to_png_bytes", "load_image", "load_samples", "samples_from_rows", "SKIP_REASONS", "DataStats", "Sample",
    "PromptSampler", "GEOMETRY_TASKS", "SYNTHETIC_KINDS", "make_synthetic_dataset", "make_synthetic_sample",
    "write_synthetic_jsonl",
]
