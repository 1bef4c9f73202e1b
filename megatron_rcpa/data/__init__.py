"""RCPA data: samples, readers (JSONL / parquet / HF ``save_to_disk``), a resumable DP-sharded prompt sampler,
synthetic verifiable domains (counting, geometry). A sample's prompt format is its model family's
(:class:`megatron_rcpa.models.families.PromptFormat`)."""

from .readers import (
    FORMATS,
    DataFileError,
    ImageSource,
    ReaderConfig,
    SampleDataset,
    SampleLoadError,
    detect_format,
    hf_disk_files,
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
    "hf_disk_files",
    "image_to_png_bytes", "load_image", "load_samples", "samples_from_rows", "SKIP_REASONS", "DataStats", "Sample",
    "PromptSampler", "GEOMETRY_TASKS", "SYNTHETIC_KINDS", "make_synthetic_dataset", "make_synthetic_sample",
    "write_synthetic_jsonl",
]
