"""Caches and the data fingerprint (through the CLI, in-process): a damaged cache file is never used (it is
rebuilt and the console says so), and an image rewritten with its size and mtime kept is new data: a fresh run
sees the new pixels and the old run folder refuses to resume."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image


COMPOUNDS = ("AZ841", "AZ258", "AZ-C", "AZ138")  # 2 MoAs x 2 compounds




@pytest.fixture
def world(data_dir, tmp_path, monkeypatch):
    """12 real subset fields as uncompressed RGB TIFFs (so that a rewrite can keep the file size), a tiny frozen
    config, and a cache of its own."""
    labels = pd.read_csv(data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv", sep=";", index_col=0)
    rows = []
    for c in COMPOUNDS:
        for i, r in labels[labels["compound"] == c].head(3).iterrows():
            path = tmp_path / "images" / f"field{i}.tif"
            path.parent.mkdir(exist_ok=True)
            tifffile.imwrite(path, np.asarray(Image.open(data_dir / "bbbc021-subset" / "images" / f"bbbc021v1_{i}.png")), photometric="rgb")
            rows.append({"Image_Path_RGB": str(path), "Metadata_MoA": r["moa"], "Metadata_Compound": c, "Metadata_Concentration": r["concentration"],
                         "Metadata_Plate": r["plate"], "Metadata_Well": r["well"]})
    pd.DataFrame(rows).to_csv(tmp_path / "images.csv", index=False)
    (tmp_path / "tiny.toml").write_text('name = "tiny"\nmode = "frozen"\ndevice = "cpu"\nsave_model = false\n[dataset]\nname = "folder"\nimage_size = 32\n'
                                        f'options = {{csv = "{tmp_path / "images.csv"}"}}\n[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\ninput_size = 32\n')
    monkeypatch.setenv("CELLMORPH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CELLMORPH_DATA", str(tmp_path))
    return tmp_path


def _probs(run) -> np.ndarray:
    p = pd.read_parquet(run / "predictions.parquet")
    return p[[c for c in p.columns if c.startswith("prob_")]].to_numpy()


def _run_ok(world, monkeypatch, capsys, out, cli) -> tuple[np.ndarray, str]:
    """`cellmorph run` of the tiny config into `out`: it must succeed; its probabilities and console text."""
    code, text = cli(monkeypatch, capsys, "run", world / "tiny.toml", "--out", out)
    assert code == 0, text
    return _probs(out), text


def _flip_middle(path) -> None:
    """The same size, other bytes: what a bad sector or a buggy copy does."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    path.write_bytes(bytes(data))


@pytest.mark.realdata
def test_a_damaged_cache_is_rebuilt_never_used(world, monkeypatch, capsys, cli):
    want, _ = _run_ok(world, monkeypatch, capsys, world / "a", cli)
    (features,) = (world / "cache" / "features").glob("*[0-9a-f].npy")
    assert not list((world / "cache" / "store").glob("*/images.npy"))  # a frozen run streams: no decoded copy cached
    for n, damage in enumerate([_flip_middle, lambda p: p.write_bytes(p.read_bytes()[: 200]), lambda p: p.write_bytes(b"")]):
        damage(features)
        got, text = _run_ok(world, monkeypatch, capsys, world / f"f{n}", cli)
        assert "cached features" in text and "damaged" in text and "extracting them again" in text, text
        np.testing.assert_array_equal(got, want)
    # The decoded store is cached for what needs every image in memory (fine-tuning, Classifier.fit): a damaged
    # copy is decoded again, never used.
    from cellmorph.data.catalog import load_dataset
    from cellmorph.data.store import build_store

    table = load_dataset("folder", world, csv=str(world / "images.csv"))
    first = build_store(table, 32).images.copy()
    (images,) = (world / "cache" / "store").glob("*/images.npy")
    _flip_middle(images)
    capsys.readouterr()
    again = build_store(table, 32).images
    text = capsys.readouterr().err
    assert "cached store" in text and "damaged" in text, text
    np.testing.assert_array_equal(again, first)


@pytest.mark.realdata
def test_an_image_rewritten_with_size_and_mtime_kept_is_new_data(world, monkeypatch, capsys, cli):
    before, _ = _run_ok(world, monkeypatch, capsys, world / "old", cli)
    target = sorted((world / "images").glob("*.tif"))[0]
    st = os.stat(target)
    pixels = tifffile.imread(target)
    tifffile.imwrite(target, 255 - pixels, photometric="rgb")  # the same size: an uncompressed TIFF of the same shape
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -t keep it
    assert os.stat(target).st_size == st.st_size and os.stat(target).st_mtime_ns == st.st_mtime_ns
    after, _ = _run_ok(world, monkeypatch, capsys, world / "new", cli)
    assert not np.array_equal(before, after) and len(after) == 12  # the new pixels were read, not the old store
    code, text = cli(monkeypatch, capsys, "run", world / "tiny.toml", "--out", world / "old")
    assert code == 2 and "computed from other data" in text, text
