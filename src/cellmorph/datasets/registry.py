"""Dataset registry: one place per dataset name for its loader (-> ImageTable), its download and its
raw-plate preparation, and the data-folder lookup.

A new dataset is one module in datasets/ with `@register(name, description)` on its loader and, where
it has them, `register_download(name, fn)` and `register_prepare(name, fn)`; `cellmorph datasets`,
`download` and `prepare` find it there.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from cellmorph.datasets.table import ImageTable
from cellmorph.errors import CellmorphError

DATA_ENV = "CELLMORPH_DATA"

# name -> loader(data_dir, **options) -> ImageTable
_LOADERS: dict[str, Callable[..., ImageTable]] = {}
_DESCRIPTIONS: dict[str, str] = {}
# name -> fn(data_dir) -> Path (fetch from the public source, checksums verified)
_DOWNLOADS: dict[str, Callable] = {}
# name -> fn(data_dir, out, **options) -> recipe dict (raw plates -> a prepared store)
_PREPARES: dict[str, Callable] = {}


def register(name: str, description: str):
    def deco(fn: Callable[..., ImageTable]):
        _LOADERS[name] = fn
        _DESCRIPTIONS[name] = description
        return fn

    return deco


def register_download(name: str, fn: Callable) -> None:
    _DOWNLOADS[name] = fn


def register_prepare(name: str, fn: Callable) -> None:
    _PREPARES[name] = fn


def downloader(name: str) -> Callable:
    """The download function of dataset `name`, or an error listing the downloadable ones."""
    _import_builtin()
    if name not in _DOWNLOADS:
        raise CellmorphError(f"no downloader for '{name}'. Downloadable: {', '.join(sorted(_DOWNLOADS))}.")
    return _DOWNLOADS[name]


def preparer(name: str) -> Callable:
    """The raw-plate preparation of dataset `name`, or an error listing the preparable ones."""
    _import_builtin()
    if name not in _PREPARES:
        raise CellmorphError(f"cannot prepare '{name}'; preparable: {', '.join(sorted(_PREPARES))}.")
    return _PREPARES[name]


def available() -> dict[str, str]:
    _import_builtin()
    return dict(_DESCRIPTIONS)


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


def load_dataset(name: str, data_dir: str | Path | None, label: str = "Metadata_MoA", **options) -> ImageTable:
    _import_builtin()
    if name not in _LOADERS:
        raise CellmorphError(f"unknown dataset '{name}'. Known datasets: {', '.join(sorted(_LOADERS))} (config field dataset.name).")
    root = resolve_data_dir(data_dir)
    try:
        return _LOADERS[name](root, label=label, **options)
    except TypeError as err:
        raise CellmorphError(f"dataset '{name}': bad option in dataset.options ({err}).") from None


def _import_builtin() -> None:
    # Importing the modules registers their loaders.
    from cellmorph.datasets import bbbc013, bbbc014, bbbc021, bbbc021_raw, crchisto, folder, prepared  # noqa: F401
