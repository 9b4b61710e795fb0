"""Datasets: each module knows one dataset's files, metadata, labels and download."""

from cellmorph.datasets.registry import available, load_dataset, resolve_data_dir
from cellmorph.datasets.table import ImageTable

__all__ = ["ImageTable", "available", "load_dataset", "resolve_data_dir"]
