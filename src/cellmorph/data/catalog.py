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
from cellmorph.data.datasets import bbbc013, bbbc014, bbbc021, bbbc021_raw, crchisto, folder, omezarr, plate, prepared  # noqa: F401  (registers them)
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError

BUILTIN = (bbbc013, bbbc014, bbbc021, bbbc021_raw, crchisto, folder, omezarr, plate, prepared)


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


def load_dataset(name: str, data_dir: str | Path | None, label: str | None = "Metadata_MoA", **options) -> ImageTable:
    """The ImageTable of dataset `name` (every built-in dataset registered), from the data folder `data_dir`
    (None: $CELLMORPH_DATA; not needed when the options name the files by absolute path); label None: the
    dataset's own label column, optional for the folder dataset (new images); a clear error for an unknown name
    or a bad option."""
    return registry.load_registered(name, data_dir, label, **options)


def prepare(name: str, data_dir: Path, out: Path, **kw) -> dict:
    """`cellmorph prepare NAME`: the raw-plate preparation dataset `name` registers (register_prepare), with the
    options it takes (an option it does not take is an error naming it)."""
    import inspect

    fn = preparer(name)
    params = inspect.signature(fn).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        extra = [k for k in kw if k not in params]
        if extra:
            flags = ", ".join("--" + k.replace("_root", "").replace("_", "-") for k in extra)
            raise CellmorphError(f"cellmorph prepare {name}: {flags} do(es) not apply to this dataset; leave it out.")
    return fn(data_dir, out, **kw)
