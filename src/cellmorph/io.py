"""Atomic file writing: write to a temporary name in the same folder, then rename.

A killed process leaves either the whole file or none (plus, at worst, a stray *.tmp-* file
that is ignored and overwritten next time).
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(dest: str | Path):
    """Yield a temporary path beside `dest`; rename it onto `dest` if the block succeeds."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.tmp-")
    except OSError as err:
        raise CellmorphError(f"cannot write in {dest.parent} ({err.strerror}). Choose a writable folder (--out).") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)


def write_json(dest: str | Path, obj) -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet(dest: str | Path, df: pd.DataFrame) -> None:
    with atomic_path(dest) as tmp:
        df.to_parquet(tmp, index=False)


def write_npy(dest: str | Path, arr: np.ndarray) -> None:
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def check_writable(folder: str | Path) -> Path:
    """Create `folder` if needed and prove it is writable; a clear error otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise CellmorphError(f"output folder {folder} is not writable ({err.strerror}). Pass --out with a folder you can write.") from None
    return folder
