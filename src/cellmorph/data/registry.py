"""Dataset registry: one place per dataset name for its loader (-> ImageTable), its download and its
raw-plate preparation, and the data-folder lookup.

A new dataset is one module in data/datasets/ with `@register(name, description)` on its loader and, where
it has them, `register_download(name, fn)` and `register_prepare(name, fn)`; add the module to
`cellmorph.data.catalog.BUILTIN` and `cellmorph datasets`, `download`, `prepare` and `run` find it.

This module holds the registrations only (it imports no dataset); the lookups are in catalog.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError

DATA_ENV = "CELLMORPH_DATA"

# name -> loader(data_dir, **options) -> ImageTable
LOADERS: dict[str, Callable[..., ImageTable]] = {}
DESCRIPTIONS: dict[str, str] = {}
# name -> fn(data_dir) -> Path (fetch from the public source, checksums verified)
DOWNLOADS: dict[str, Callable] = {}
# name -> fn(data_dir, out, **options) -> recipe dict (raw plates -> a prepared store)
PREPARES: dict[str, Callable] = {}


# name -> fn(options) -> True when these options locate every file themselves (an absolute path), so that no
# data folder (--data / $CELLMORPH_DATA) is needed; the loader then gets data_dir = None.
NEEDS_NO_DATA: dict[str, Callable[[dict], bool]] = {}


def register(name: str, description: str, needs_no_data: Callable[[dict], bool] | None = None):
    def deco(fn: Callable[..., ImageTable]):
        LOADERS[name] = fn
        DESCRIPTIONS[name] = description
        if needs_no_data is not None:
            NEEDS_NO_DATA[name] = needs_no_data
        return fn

    return deco


def register_download(name: str, fn: Callable) -> None:
    DOWNLOADS[name] = fn


def register_prepare(name: str, fn: Callable) -> None:
    PREPARES[name] = fn


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """The data folder: the explicit option first, then $CELLMORPH_DATA."""
    if data_dir is None:
        env = os.environ.get(DATA_ENV)
        if not env:
            raise CellmorphError(
                f"no data folder given. Pass --data DIR or set {DATA_ENV}=DIR (the folder that holds "
                "bbbc021-subset/ etc.; `cellmorph download bbbc021-subset --data DIR` fetches it)."
            )
        data_dir = env
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise CellmorphError(f"data folder {path} does not exist. Pass --data DIR or set {DATA_ENV} to an existing folder.")
    return path.resolve()


def is_absolute_option(key: str) -> Callable[[dict], bool]:
    """A `needs_no_data` rule: the option `key` is an absolute path (e.g. the folder dataset's csv)."""
    return lambda options: isinstance(options.get(key), str) and Path(options[key]).expanduser().is_absolute()


def load_registered(name: str, data_dir: str | Path | None, label: str | None = "Metadata_MoA", **options) -> ImageTable:
    """The ImageTable of a dataset whose module has registered its loader (callers outside data/ use
    cellmorph.data.catalog.load_dataset, which registers every built-in dataset first). label None: the
    dataset's own label column (the folder dataset: Metadata_MoA when the CSV has it, else no label: new images
    to predict). No data folder is needed when the options locate the files themselves (an absolute csv)."""
    if name not in LOADERS:
        raise CellmorphError(f"unknown dataset '{name}'. Known datasets: {', '.join(sorted(LOADERS))} (config field dataset.name).")
    no_data = data_dir is None and not os.environ.get(DATA_ENV) and name in NEEDS_NO_DATA and NEEDS_NO_DATA[name](options)
    root = None if no_data else resolve_data_dir(data_dir)
    try:
        return LOADERS[name](root, **({} if label is None else {"label": label}), **options)
    except TypeError as err:
        raise CellmorphError(f"dataset '{name}': bad option in dataset.options ({err}).") from None
