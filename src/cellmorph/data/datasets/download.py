"""Downloads with SHA-256 checks. Nothing here runs in the tests (no network there);
`verify_manifest` is what checks a local copy and is tested offline."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import urllib.request
from importlib import resources
from pathlib import Path

from cellmorph.errors import CellmorphError


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(name: str) -> dict[str, str]:
    """Relative path -> SHA-256, from the manifest shipped in cellmorph/datasets/checksums/."""
    text = resources.files("cellmorph.data.datasets").joinpath("checksums", f"{name}.sha256").read_text()
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            digest, rel = line.split(maxsplit=1)
            out[rel.strip()] = digest
    return out


def verify_manifest(root: Path, manifest: dict[str, str]) -> list[str]:
    """Relative paths that are missing or whose checksum differs (empty list = all good)."""
    bad = []
    for rel, digest in manifest.items():
        p = root / rel
        if not p.is_file() or sha256_file(p) != digest:
            bad.append(rel)
    return bad


def fetch(url: str, dest: Path, sha256: str | None = None) -> Path:
    """Download `url` to `dest` via a temporary file; check its SHA-256 when given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False, suffix=".part") as tmp:
        tmp_path = Path(tmp.name)
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                shutil.copyfileobj(r, tmp)
        except OSError as err:
            tmp_path.unlink(missing_ok=True)
            raise CellmorphError(f"download of {url} failed ({err}). Check the network, or copy the files by hand.") from None
    if sha256 is not None and (got := sha256_file(tmp_path)) != sha256:
        tmp_path.unlink(missing_ok=True)
        raise CellmorphError(f"{url}: checksum mismatch (expected {sha256}, got {got}). The source changed or the download broke.")
    tmp_path.replace(dest)
    return dest
