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


NUCLEI_IMAGES = (5, 6, 7, 8, 9, 10)  # CRCHistoPhenotypes images with at least 10 nuclei of each of the 3 classes


def write_nuclei_patches(data_dir: Path, folder: Path, per_class: int = 4, new_per_class: int = 2, size: int = 27) -> Path:
    """A scientist's own table, as issue 24's user had it: size x size H&E nucleus patches cut from 6 real
    CRCHistoPhenotypes images and saved as PNG files, one patient per source image. Writes `cells.csv`
    (Image_Path_HE relative to the CSV, Metadata_Label, Metadata_Patient; `per_class` nuclei per class and patient)
    and `new.csv` (other nuclei of the same images, no label column: new images to predict). Returns `folder`."""
    from cellmorph.data.datasets.crchisto import CLASSES, read_centres

    root = data_dir / "crchistophenotypes"
    (folder / "patches").mkdir(parents=True, exist_ok=True)
    half = size // 2
    rows, new = [], []
    for n in NUCLEI_IMAGES:
        pixels = np.asarray(Image.open(root / f"img{n}" / f"img{n}.png").convert("RGB"))
        for cls in CLASSES:
            xy = np.rint(read_centres(root / f"img{n}" / f"img{n}_{cls}.mat")).astype(int) - 1
            inside = [(x, y) for x, y in xy if half <= x < pixels.shape[1] - half and half <= y < pixels.shape[0] - half]
            for k, (x, y) in enumerate(inside[: per_class + new_per_class]):
                name = f"patches/p{n:02d}_{cls}_{k}.png"
                Image.fromarray(pixels[y - half : y + half + 1, x - half : x + half + 1]).save(folder / name)
                row = {"Image_Path_HE": name, "Metadata_Patient": n}
                (rows if k < per_class else new).append({**row, "Metadata_Label": cls} if k < per_class else row)
    pd.DataFrame(rows).to_csv(folder / "cells.csv", index=False)
    pd.DataFrame(new).to_csv(folder / "new.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def nuclei_patches(data_dir, tmp_path_factory) -> Path:
    """write_nuclei_patches in a session folder (skipped, or failed under CELLMORPH_REQUIRE_DATA=1, without the data)."""
    if not (data_dir / "crchistophenotypes" / "img1" / "img1.png").is_file():
        msg = f"CRCHistoPhenotypes not found under {data_dir}/crchistophenotypes"
        if os.environ.get("CELLMORPH_REQUIRE_DATA") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return write_nuclei_patches(data_dir, tmp_path_factory.mktemp("nuclei-patches"))


# Frozen offline ImageNet EfficientNet-Lite0 on 27x27 patches upsampled to 32 px: a real model in about a second.
NUCLEI_CONFIG = ('name = "patches"\nmode = "frozen"\ndevice = "cpu"\n[dataset]\nname = "folder"\nlabel = "Metadata_Label"\n'
                 'options = {{csv = "{csv}"}}\n[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\ninput_size = 32\n'
                 '[frozen]\nbatch_size = 64\n[evaluation]\nprotocol = "logo"\ngroup = "Metadata_Patient"\n')


@pytest.fixture(scope="session")
def nuclei_config():
    """nuclei_config(folder, **replace): the config text (NUCLEI_CONFIG) of a run on `folder`/cells.csv (absolute path)."""
    return lambda folder, csv="cells.csv": NUCLEI_CONFIG.format(csv=Path(folder) / csv)


@pytest.fixture
def no_image_decoded(monkeypatch):
    """Any image opened or decoded in the test (a field, a header, a patch) fails it: for checks that must come
    before any work."""
    import PIL.Image

    from cellmorph.data import preprocess, stream

    def refuse(*args, **kwargs):
        raise AssertionError(f"an image was opened or decoded: {args[:1]}")

    for module, name in ((stream, "load_field"), (preprocess, "read_image"), (preprocess, "load_field"), (PIL.Image, "open")):
        monkeypatch.setattr(module, name, refuse)
    return refuse


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    """`cellmorph ARGS` in this process: (exit code, everything printed, whitespace collapsed)."""
    import sys

    from cellmorph.cli import main

    monkeypatch.setattr(sys, "argv", ["cellmorph", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    captured = capsys.readouterr()
    return code, " ".join((captured.out + captured.err).split())


@pytest.fixture(scope="session")
def cli():
    """run_cli(monkeypatch, capsys, *args) -> (exit code, output)."""
    return run_cli


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
