"""The one owner of every folder cellmorph writes: run folders, model bundles, predict outputs, prepared
stores, embeddings and summaries (the caches under $CELLMORPH_CACHE are cellmorph's whole).

Each kind of folder has a layout: the names of the files and subfolders cellmorph writes there
(`Layout`, registered once per kind; the run folder's grows with every registered output). On top of
it, four rules, each one function here:

- **claim** (`claim`): a folder that holds anything cellmorph did not write is refused, with one of
  those files named: cellmorph never overwrites or deletes a user's file.
- **lock** (`locked`): one process at a time per folder. The lock is a file beside the folder,
  `.<name>.lock`, held with flock (released by the kernel when the process dies, so a killed run never
  leaves a stale lock); a second process is refused with one line naming the holder's pid and start.
- **atomic writes**: a file is written under `.<name>.tmp-XXXX` and renamed (`cellmorph.io.atomic_path`);
  a folder that must appear whole (a bundle, a predict output, a fold) is built in a temporary sibling
  `.<name>.tmp-XXXX` and renamed into place (`staged_folder`), the old one set aside as `.<name>.old-XXXX`
  and removed only after the swap. Third-party writers write inside these temporaries (safetensors'
  bytes are written by cellmorph itself, so no temporary of theirs can escape).
- **cleanup** (`clean_temporaries`): the next command on a folder removes every temporary of ours that a
  killed process left (`.<own name>.tmp-*` / `.old-*`, files, and folders holding only our files), and
  nothing else.

Example:
    >>> from cellmorph.storage import claim, locked
    >>> with locked(out):
    ...     claim(out, PREDICT)          # refuses a folder of the user's, cleans our leftovers
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from cellmorph.errors import CellmorphError
from cellmorph.io import check_writable, is_no_space, no_space_error, process_umask, write_text

TMP, OLD = ".tmp-", ".old-"  # `.<name>.tmp-XXXX`: being written; `.<name>.old-XXXX`: set aside during a swap
LOCK_SUFFIX = ".lock"


@dataclass(frozen=True)
class Layout:
    """What cellmorph writes in one kind of folder.

    `files`: file names (at the top, or in any own subfolder); `folders`: regular expressions of the own
    subfolders' names, relative to the folder (e.g. r"folds/\\d\\d"); `marker`: the file whose presence
    says the folder is cellmorph's of this kind (a claim of a folder without it refuses any content)."""

    kind: str
    files: tuple[str, ...]
    folders: tuple[str, ...] = ()
    marker: str = ""
    extra_files: list[str] = field(default_factory=list, compare=False)  # registered later (a run's outputs)

    @property
    def names(self) -> set[str]:
        return {*self.files, *self.extra_files}

    def add_files(self, *names: str) -> None:
        """Register more file names (an output of a run folder: its plots and tables)."""
        self.extra_files.extend(n for n in names if n not in self.names)

    def owns_file(self, name: str) -> bool:
        return name in self.names

    def owns_folder(self, relative: str) -> bool:
        return any(re.fullmatch(p, relative) for p in self.folders)


# --- the layouts ----------------------------------------------------------------------------------------------

BUNDLE = Layout("bundle", ("model.safetensors", "bundle.json", "config.toml", "calibration.parquet", "reference_profiles.npz",
                               "image_reference.npz"),
                marker="bundle.json")
PROFILE_FILES = ("embeddings.parquet", "profiles_well.parquet", "profiles_treatment.parquet", "profile_metrics.json", "profiles.png")
RUN = Layout("run folder", ("config.toml", "dataset.json", "environment.json", "fold.json", "history.json", "curve_probs.npy",
                            "predictions.parquet", "model.pt", "metrics.json", "treatments.csv", "wells.csv", "report.html",
                            "confusion.png", "reliability.png", "coverage.png", "novelty.png", "novelty_treatments.csv", "novelty_wells.csv",
                            "novelty_images.csv", "activation_maximization.png", "gradcam.png", *PROFILE_FILES,
                            "summary.csv", "summary.md", "curves.png", "training_curves.png", *BUNDLE.files),
             folders=(r"folds", r"folds/\d\d", r"seeds", r"seeds/\d+", r"seeds/\d+/folds", r"seeds/\d+/folds/\d\d", r"model", r"summary"),
             marker="config.toml")
PREDICT = Layout("predict output", ("predictions.parquet", "wells.csv", "treatments.csv", "report.html", "predict.json"), marker="predict.json")
PREPARED = Layout("prepared store", ("images.npy", "index.parquet", "prepared.json"), marker="prepared.json")
EMBEDDINGS = Layout("embeddings folder", PROFILE_FILES)
SUMMARY = Layout("summary folder", ("summary.csv", "summary.md", "curves.png"))
EXPLAIN = Layout("explain folder", ("activation_maximization.png", "gradcam.png"))
LAYOUTS = {x.kind: x for x in (BUNDLE, RUN, PREDICT, PREPARED, EMBEDDINGS, SUMMARY, EXPLAIN)}

MODEL_DIR = "model"  # a run folder's final model (a BUNDLE)


def seed_folder(out: str | Path, seed: int, seeds: list[int]) -> Path:
    """Where one seed's folds and results live in a run folder: the folder itself for a single seed,
    `seeds/S/` when the run has several. The one definition of that rule."""
    out = Path(out)
    return out if len(seeds) == 1 else out / "seeds" / str(seed)


def fold_folder(folder: str | Path, i: int) -> Path:
    """`folds/NN` of a seed's folder."""
    return Path(folder) / "folds" / f"{i:02d}"


# --- temporaries --------------------------------------------------------------------------------------------

def temporary_of(name: str, layout: Layout | None = None, own: set[str] | None = None) -> bool:
    """Whether `name` is one of cellmorph's temporaries: `.<own name>.tmp-XXXX` or `.<own name>.old-XXXX`."""
    m = re.fullmatch(r"\.(.+)\.(tmp|old)-[A-Za-z0-9_]+", name) or re.fullmatch(r"\.(.+)()\.lock", name)
    if not m:
        return False
    names = set(own or ()) | (layout.names if layout else set())
    base = m.group(1)
    return base in names or (layout is not None and any(re.fullmatch(p, base) or re.fullmatch(p.rsplit("/", 1)[-1], base) for p in layout.folders))


def _only_own_files(folder: Path, names: set[str]) -> bool:
    for f in folder.rglob("*"):
        if f.is_symlink() or (f.is_file() and f.name not in names and not temporary_of(f.name, own=names)):
            return False
    return True


def remove_own_folder(folder: Path, names: set[str]) -> bool:
    """Remove a temporary or set-aside folder of ours: only when every file in it is one of `names` (or a
    temporary of one); a folder holding anything else is left. True when it is gone."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    if not _only_own_files(folder, names):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()


def clean_temporaries(folder: str | Path, layout: Layout) -> list[Path]:
    """Remove what a killed cellmorph process left in `folder` (and its own subfolders) and beside it, and
    nothing else: `.<own name>.tmp-*` / `.old-*` files, and such folders when they hold only our files.
    Returns what was removed."""
    folder = Path(folder)
    removed: list[Path] = []
    names = layout.names
    places = [folder] if folder.is_dir() else []
    for d in list(places):
        for sub in d.rglob("*"):
            rel = sub.relative_to(folder).as_posix()
            if sub.is_dir() and not sub.is_symlink() and layout.owns_folder(rel):
                places.append(sub)
    if folder.parent.is_dir():
        places.append(folder.parent)
    for d in places:
        try:
            entries = list(d.iterdir())
        except OSError:
            continue
        for f in entries:
            beside = d == folder.parent and d != folder
            if beside and not re.fullmatch(rf"\.{re.escape(folder.name)}\.(tmp|old)-[A-Za-z0-9_]+", f.name):
                continue
            if not beside and not temporary_of(f.name, layout):
                continue
            if f.name.endswith(LOCK_SUFFIX):
                if f.is_file() and remove_stale_lock(f):  # a killed process's: nobody holds it
                    removed.append(f)
                continue
            if f.is_symlink():
                continue
            if f.is_file():
                f.unlink(missing_ok=True)
                removed.append(f)
            elif f.is_dir() and not _held(f) and remove_own_folder(f, names | {LOCK_SUFFIX}):
                removed.append(f)
    return removed


def _held(folder: Path) -> bool:
    """A temporary folder another live process is writing: its sibling lock is held."""
    m = re.fullmatch(r"\.(.+)\.(tmp|old)-[A-Za-z0-9_]+", folder.name)
    holder = lock_holder(folder.parent / m.group(1)) if m else None
    return holder is not None and not holder.startswith(f"pid {os.getpid()} ")


# --- checksums of what cellmorph reads back (the caches) -------------------------------------------------------

DIGEST_SUFFIX = ".blake2b"


def file_digest(path: str | Path) -> str:
    """BLAKE2b (128-bit) of a file's bytes: a fast content hash (about 460 MB/s on one busy core here)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_digest(path: str | Path) -> None:
    """Record `path`'s content hash beside it (`NAME.blake2b`), after `path` itself is complete."""
    path = Path(path)
    write_text(path.with_name(path.name + DIGEST_SUFFIX), file_digest(path) + "\n", "cache")


def digest_ok(path: str | Path) -> bool:
    """Whether `path` still holds the bytes `write_digest` recorded (False: changed, damaged, or never recorded)."""
    path = Path(path)
    side = path.with_name(path.name + DIGEST_SUFFIX)
    try:
        return side.read_text().strip() == file_digest(path)
    except OSError:
        return False


# --- claiming ----------------------------------------------------------------------------------------------

def foreign_entries(folder: Path, layout: Layout) -> list[Path]:
    """What is in `folder` that cellmorph did not write under `layout` (own temporaries are ours)."""
    out = []
    if not folder.is_dir():
        return out
    stack = [folder]
    while stack:
        d = stack.pop()
        for f in sorted(d.iterdir()):
            rel = f.relative_to(folder).as_posix()
            if temporary_of(f.name, layout):
                continue
            if f.is_dir() and not f.is_symlink() and layout.owns_folder(rel):
                stack.append(f)
            elif not (f.is_file() and layout.owns_file(f.name)):
                out.append(f)
    return out


def claim(folder: str | Path, layout: Layout, what: str = "--out", overwrite: bool | None = None) -> Path:
    """Make `folder` ours to write: refused when it is a file, or holds anything cellmorph did not write
    (one such file named); our own leftovers of a killed process are removed. `overwrite` = False refuses
    a folder that already holds a complete one of this kind (its marker), e.g. an earlier prediction.
    Creates the folder's parent, not the folder (a staged folder appears by rename).

    Call it while holding `locked(folder)`."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CellmorphError(f"{what} {folder}: a file is there, not a folder. Choose a folder path.")
    foreign = foreign_entries(folder, layout)
    if foreign:
        first = foreign[0]
        raise CellmorphError(
            f"{what} {folder} holds files cellmorph did not write (e.g. {first.relative_to(folder)}): not a cellmorph {layout.kind}. "
            "Choose another (or an empty) folder; cellmorph never overwrites or deletes files it did not write.")
    clean_temporaries(folder, layout)
    if overwrite is False and layout.marker and (folder / layout.marker).is_file():
        raise CellmorphError(f"{what} {folder}: a {layout.kind} already exists there (an earlier one). Pass --overwrite (overwrite=True in Python) "
                             "to replace it, or choose another folder.")
    return folder


# --- locking -----------------------------------------------------------------------------------------------

def _lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}{LOCK_SUFFIX}"


def _try_lock(path: Path, exclusive: bool) -> tuple[int, bool] | None:
    """Open a lock file and try to take it without waiting: (fd, taken), or None when there is no file."""
    try:
        fd = os.open(path, os.O_RDWR if exclusive else os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return fd, True
    except OSError:
        return fd, False


def remove_stale_lock(path: Path) -> bool:
    """Remove a lock file nobody holds (left by a killed process), taking it first so that no process can
    acquire it in between (a process that opened it before the removal finds it unlinked and retries, see
    `locked`). Returns whether it was removed."""
    probe = _try_lock(path, exclusive=True)
    if probe is None:
        return False
    fd, taken = probe
    try:
        if taken:  # nobody holds it: a killed process's
            path.unlink(missing_ok=True)
        return taken
    finally:
        os.close(fd)


def lock_holder(folder: str | Path) -> str | None:
    """Who holds `folder`'s lock ("pid 123 since ..."), or None when nobody does."""
    probe = _try_lock(_lock_path(Path(folder)), exclusive=False)
    if probe is None:
        return None
    fd, taken = probe
    try:
        return None if taken else (os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process")
    finally:
        os.close(fd)


@contextmanager
def locked(folder: str | Path, what: str = "--out"):
    """Hold the lock of `folder` for the block; a second process is refused with one line naming the holder.

    The lock file `.<name>.lock` lives beside the folder (a folder swapped in by rename keeps its lock) and is
    removed when released; flock is released by the kernel when the holder dies."""
    folder = Path(folder).expanduser()
    path = _lock_path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CellmorphError(f"cannot write in {folder.parent} ({err.strerror}). Choose a writable folder ({what}).") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~process_umask())
        except OSError as err:
            if is_no_space(err):
                raise no_space_error(folder, err) from None
            raise CellmorphError(f"cannot write in {folder.parent} ({err.strerror}). Choose a writable folder ({what}).") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise CellmorphError(f"{what} {folder} is in use by another cellmorph process ({holder}). "
                                 "Wait for it to finish, or choose another folder.") from None
        try:  # the file we locked must still be the lock file (a releasing holder unlinks it)
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    since = datetime.now(timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} since {since}".encode(), 0)
    try:
        yield folder
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)


@contextmanager
def writing(folder: str | Path, layout: Layout, what: str = "--out"):
    """Lock `folder`, claim it for `layout` (refusing a user's files, cleaning our leftovers) and create it: the
    way every verb that writes files into a folder starts (embed, profiles evaluate, summarize, explain).

    Example:
        >>> with writing(out, SUMMARY) as folder:
        ...     write_text(folder / "summary.md", text)"""
    folder = Path(folder).expanduser()
    with locked(folder, what):
        claim(folder, layout, what)
        check_writable(folder)
        yield folder


# --- folders written whole ------------------------------------------------------------------------------------

def make_temporary_folder(dest: Path, what: str = "--out") -> Path:
    """An empty `.<name>.tmp-XXXX` folder beside `dest` with the usual permissions."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}{TMP}"))
    except OSError as err:
        if is_no_space(err):
            raise no_space_error(dest, err) from None
        raise CellmorphError(f"cannot write in {dest.parent} ({err.strerror}). Choose a writable folder ({what}).") from None
    os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp makes 0700
    return tmp


def swap_into_place(tmp: Path, dest: Path, layout: Layout) -> None:
    """Rename the complete folder `tmp` onto `dest`. An existing `dest` (ours: checked by `claim`) is set
    aside as `.<name>.old-XXXX` first and removed after the swap, so a kill at any point leaves the old or
    the new folder whole (and at worst a temporary the next command removes)."""
    if dest.is_dir() and any(dest.iterdir()):
        old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}{OLD}"))
        os.replace(dest, old / dest.name)
        os.replace(tmp, dest)
        remove_own_folder(old, layout.names)
        return
    if dest.is_dir():
        dest.rmdir()
    os.replace(tmp, dest)


@contextmanager
def staged_folder(dest: str | Path, layout: Layout, what: str = "--out"):
    """Yield an empty temporary folder beside `dest`; when the block succeeds, it replaces `dest` whole
    (`swap_into_place`); when it fails, it is removed (only our files in it). A full disk in the block
    is the one-line no-space error naming `dest`.

    Example:
        >>> with staged_folder(out, PREDICT) as tmp:
        ...     (tmp / "predict.json").write_text("{}")"""
    dest = Path(dest)
    tmp = make_temporary_folder(dest, what)
    try:
        try:
            yield tmp
        except CellmorphError:
            raise
        except Exception as err:  # a library reports a full disk in its own way (pyarrow, safetensors)
            if is_no_space(err) or "no space left" in str(err).lower():
                raise no_space_error(dest, err) from None
            raise
        swap_into_place(tmp, dest, layout)
    finally:
        if tmp.exists():  # made by us just now: everything in it is ours
            shutil.rmtree(tmp, ignore_errors=True)
