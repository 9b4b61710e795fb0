"""Shared fixtures. Real-data tests use the `data_dir` fixture: it finds the datasets through
$CELLMORPH_DATA (or ../shared/data beside the repo) and skips with the reason when they are absent;
with CELLMORPH_REQUIRE_DATA=1 (set by CI) a missing dataset fails instead of skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own store/feature cache unless CELLMORPH_CACHE is set."""
    if not os.environ.get("CELLMORPH_CACHE"):
        os.environ["CELLMORPH_CACHE"] = str(tmp_path_factory.mktemp("cellmorph-cache"))
    yield


def _find_data() -> Path | None:
    for cand in (os.environ.get("CELLMORPH_DATA"), REPO.parent / "shared" / "data"):
        if cand and (Path(cand) / "bbbc021-subset" / "bbbc021v1_labels.csv").is_file():
            return Path(cand).resolve()
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    found = _find_data()
    if found is None:
        msg = "real datasets not found: set CELLMORPH_DATA to the folder holding bbbc021-subset/ (e.g. ../shared/data)"
        if os.environ.get("CELLMORPH_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return found


@pytest.fixture(scope="session")
def subset_table(data_dir):
    from cellmorph.data.catalog import load_dataset

    return load_dataset("bbbc021-subset", data_dir)


@pytest.fixture(scope="session")
def crchisto_table(data_dir):
    """The real CRCHistoPhenotypes nuclei (3 classes), or a skip/fail with the reason like data_dir."""
    from cellmorph.data.catalog import load_dataset

    if not (data_dir / "crchistophenotypes" / "img1" / "img1.png").is_file():
        msg = f"CRCHistoPhenotypes not found under {data_dir}/crchistophenotypes"
        if os.environ.get("CELLMORPH_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return load_dataset("crchisto", data_dir, label="Metadata_Label")
