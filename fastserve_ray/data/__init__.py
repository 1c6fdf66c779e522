"""Data layer: corpora readers, the built-in corpus, tokenization into Parquet shards,
the data manifest, and loading (numpy or Ray Data)."""

from fastserve_ray.data.corpus import BUILTIN_FLAVOURS, builtin_documents
from fastserve_ray.data.loading import ray_dataset, read_split, split_files
from fastserve_ray.data.manifest import (
    DataManifest,
    ShardInfo,
    SplitInfo,
    check_data_fits_model,
    load_data_manifest,
)
from fastserve_ray.data.prepare import prepare_data
from fastserve_ray.data.readers import Document, iter_documents

__all__ = [
    "BUILTIN_FLAVOURS",
    "DataManifest",
    "Document",
    "ShardInfo",
    "SplitInfo",
    "builtin_documents",
    "check_data_fits_model",
    "iter_documents",
    "load_data_manifest",
    "prepare_data",
    "ray_dataset",
    "read_split",
    "split_files",
]
