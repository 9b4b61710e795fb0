"""Atomic file writing: write to a temporary name in the same folder, then rename.

A killed process leaves either the whole file or none (plus, at worst, a stray `.NAME.tmp-*` file
that is ignored and overwritten next time; the run folder, store and prepare code remove the
temporaries of their own file names).

Every write here turns the faults a user can fix into a CellmorphError naming the file:
a folder that cannot be written (`what` says which folder it is and how to choose another) and a
full disk or exhausted quota (ENOSPC, EDQUOT): free space and rerun the same command, which resumes.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError


def process_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status); elsewhere the set-and-restore
    fallback, at first use rather than at import (no process-wide side effect when cellmorph is imported)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "errno 28", "errno 122")

# What a folder is, for the messages: (its name, how to choose another). "output" is every folder named
# by --out (run folders, summaries, prepared stores); "cache" the store and feature cache.
FOLDERS = {
    "output": ("output folder", "Pass --out with a folder you can write."),
    "cache": ("cache folder", "Set CELLMORPH_CACHE to a writable folder."),
}


def _folder(what: str) -> tuple[str, str]:
    if what not in FOLDERS:
        raise ValueError(f"what={what!r}: expected one of {sorted(FOLDERS)}")
    return FOLDERS[what]


def is_no_space(err: BaseException) -> bool:
    """A full disk or an exhausted quota, however the writing library reported it (OSError with errno
    ENOSPC/EDQUOT, or a library error whose message carries it, e.g. pyarrow's or torch's)."""
    if isinstance(err, OSError) and err.errno in NO_SPACE:
        return True
    text = str(err).lower()
    return isinstance(err, (OSError, RuntimeError)) and any(t in text for t in _NO_SPACE_TEXT)


def no_space_error(dest: str | Path, err: BaseException | None = None) -> CellmorphError:
    quota = err is not None and ((isinstance(err, OSError) and err.errno == errno.EDQUOT) or "quota" in str(err).lower())
    return CellmorphError(
        f"no space left on the device writing {dest}{' (disk quota exceeded)' if quota else ''}; "
        "free space and rerun the same command (it resumes)."
    )


@contextmanager
def no_space_is_an_error(dest: str | Path):
    """Turn a full disk inside the block into the CellmorphError that names `dest` and the fix."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        if is_no_space(err) or _device_full(Path(dest).parent):
            raise no_space_error(dest, err) from None
        raise


def _device_full(folder: Path) -> bool:
    """No free block left where `folder` lives: what a write error that hides its errno (torch.save's
    "file write failed") means there."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < 64 * 1024


@contextmanager
def atomic_path(dest: str | Path, what: str = "output"):
    """Yield a temporary path beside `dest`; rename it onto `dest` if the block succeeds.

    `what` names the folder in the error when it cannot be written: "output" (default: run folders,
    anything under --out) or "cache" (under CELLMORPH_CACHE). A full disk while writing, in the block
    or on the rename, is a CellmorphError naming `dest`.
    """
    dest = Path(dest)
    name, fix = _folder(what)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.tmp-")
    except OSError as err:
        if is_no_space(err):
            raise no_space_error(dest, err) from None
        if what == "output":  # the run folders' message, unchanged
            raise CellmorphError(f"cannot write in {dest.parent} ({err.strerror}). Choose a writable folder (--out).") from None
        raise CellmorphError(f"cannot write in the {name} {dest.parent} ({err.strerror}). {fix}") from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~process_umask())  # mkstemp makes 0600; give the file the usual permissions
    tmp = Path(tmp)
    try:
        with no_space_is_an_error(dest):
            yield tmp
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(dest: str | Path, text: str, what: str = "output") -> None:
    with atomic_path(dest, what) as tmp:
        tmp.write_text(text)


def write_json(dest: str | Path, obj, what: str = "output") -> None:
    write_text(dest, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", what)


def write_parquet(dest: str | Path, df: pd.DataFrame, what: str = "output") -> None:
    with atomic_path(dest, what) as tmp:
        df.to_parquet(tmp, index=False)


def write_npy(dest: str | Path, arr: np.ndarray, what: str = "output") -> None:
    with atomic_path(dest, what) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def check_writable(folder: str | Path, what: str = "output") -> Path:
    """Create `folder` if needed and prove it is writable; a clear error otherwise.

    `what`: "output" (default; the message points at --out) or "cache" (it points at CELLMORPH_CACHE).
    """
    folder = Path(folder)
    name, fix = _folder(what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        if is_no_space(err):
            raise CellmorphError(f"no space left on the device of the {name} {folder}; free space and rerun the same command (it resumes).") from None
        raise CellmorphError(f"{name} {folder} is not writable ({err.strerror}). {fix}") from None
    return folder
