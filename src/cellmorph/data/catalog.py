"""The dataset catalogue: every built-in dataset module imported (importing one registers its loader,
download and preparation in cellmorph.data.registry), and the lookups by name.

Example:
    >>> from cellmorph.data.catalog import load_dataset
    >>> table = load_dataset("bbbc021-subset", "~/data")
    >>> len(table)
    660
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from cellmorph.data import registry
from cellmorph.data.datasets import bbbc013, bbbc014, bbbc021, bbbc021_raw, crchisto, folder, prepared  # noqa: F401  (registers them)
from cellmorph.data.registry import resolve_data_dir
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError

BUILTIN = (bbbc013, bbbc014, bbbc021, bbbc021_raw, crchisto, folder, prepared)


def downloader(name: str) -> Callable:
    """The download function of dataset `name`, or an error listing the downloadable ones."""
    if name not in registry.DOWNLOADS:
        raise CellmorphError(f"no downloader for '{name}'. Downloadable: {', '.join(sorted(registry.DOWNLOADS))}.")
    return registry.DOWNLOADS[name]


def preparer(name: str) -> Callable:
    """The raw-plate preparation of dataset `name`, or an error listing the preparable ones."""
    if name not in registry.PREPARES:
        raise CellmorphError(f"cannot prepare '{name}'; preparable: {', '.join(sorted(registry.PREPARES))}.")
    return registry.PREPARES[name]


def available() -> dict[str, str]:
    return dict(registry.DESCRIPTIONS)


def load_dataset(name: str, data_dir: str | Path | None, label: str = "Metadata_MoA", **options) -> ImageTable:
    if name not in registry.LOADERS:
        raise CellmorphError(f"unknown dataset '{name}'. Known datasets: {', '.join(sorted(registry.LOADERS))} (config field dataset.name).")
    root = resolve_data_dir(data_dir)
    try:
        return registry.LOADERS[name](root, label=label, **options)
    except TypeError as err:
        raise CellmorphError(f"dataset '{name}': bad option in dataset.options ({err}).") from None
