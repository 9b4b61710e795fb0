"""Shared fixtures. Real-data tests use the `data_dir` fixture: it finds the datasets through
$CELLMORPH_DATA (or ../shared/data beside the repo) and skips with the reason when they are absent;
with CELLMORPH_REQUIRE_DATA=1 (set by CI) a missing dataset fails instead of skipping."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellmorph.data.table import ImageTable

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


# A fine-tune small enough for a unit test on 2 cores (resnet18 at 32 px, one epoch).
TINY_FINETUNE = {"model.input_size": 32, "finetune.epochs": 1, "finetune.batch_size": 4, "finetune.amp": False, "device": "cpu"}


def make_toy_table(folder, n=8, channels=3) -> ImageTable:
    """n small PNGs of two classes (bright vs dark), one of them unlabelled."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        level = 200 if i % 2 else 40
        pixels = np.clip(rng.normal(level, 20, (40, 48, channels)), 0, 255).astype(np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(path)
        rows.append({"Metadata_Image": i, "Metadata_MoA": "" if i == n - 1 else ("bright" if i % 2 else "dark"), "Image_Path_RGB": str(path)})
    return ImageTable(pd.DataFrame(rows), name="toy", required=())


@pytest.fixture(scope="session")
def tiny_finetune() -> dict:
    """Config overrides of a fine-tune small enough for a unit test (TINY_FINETUNE)."""
    return dict(TINY_FINETUNE)


@pytest.fixture(scope="session")
def toy_table_maker():
    """make_toy_table: n small PNGs of two classes written into a folder, as an ImageTable."""
    return make_toy_table


@pytest.fixture(scope="session")
def screen_world(subset_table, tmp_path_factory):
    """A tiny frozen bundle (offline ImageNet EfficientNet-Lite0 at 32 px + logistic head, fitted on up to 48 real
    subset fields of 3 plates) and a LoadData CSV of other fields of the same plates (34): a small screen."""
    from cellmorph.models.classifier import Classifier

    df = subset_table.df
    plates = df["Metadata_Plate"].drop_duplicates().iloc[:3]
    rows = df[df["Metadata_Plate"].isin(plates)]
    train, new = rows.iloc[::2].iloc[:48], rows.iloc[1::2].iloc[:48]
    root = tmp_path_factory.mktemp("screen")
    table = ImageTable(train.reset_index(drop=True), name="screen-train", label=subset_table.label, source="test")
    clf = Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen",
                     overrides={"model.input_size": 32, "dataset.image_size": 32, "frozen.batch_size": 8, "device": "cpu"})
    clf.fit(table).save(root / "bundle")
    paths = new["Image_Path_RGB"].map(os.path.split)
    load = new[["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration"]].copy()
    load["Image_FileName_RGB"] = [f for _, f in paths]
    load["Image_PathName_RGB"] = [d for d, _ in paths]
    load.to_csv(root / "load_data.csv", index=False)
    return root


@pytest.fixture(scope="session")
def quick_run(data_dir, tmp_path_factory):
    """The quickstart (frozen EfficientNet-Lite0, LOCO) on the real subset, first fold only, through the CLI, with its
    final model (RUN/model); shared by the prediction and report tests."""
    out = tmp_path_factory.mktemp("run") / "quick"
    env = {**os.environ, "CELLMORPH_DATA": str(data_dir)}
    res = subprocess.run([sys.executable, "-m", "cellmorph", "run", str(REPO / "configs" / "quickstart.toml"), "--out", str(out),
                          "--set", "evaluation.max_folds=1"], env=env, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr[-2000:]
    return out
