"""Raw-plate preprocessing, checked against a straightforward implementation of the paper's formulas
(Kensert et al. 2019: Anscombe; per plate and channel, z-score by all DMSO pixels; per-field min-max to
0-255; 2 x 2 crops; crops with <= 0.2% of values > 255/5.1 dropped) on a tiny synthetic plate."""

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.data.datasets.synthetic import write_bbbc021_metadata, write_bbbc021_plate
from cellmorph.data.preprocess import anscombe_stats, near_empty, normalize_field, pixel_histogram, scaled_tables, tile_boxes, zscore_tables
from cellmorph.data.datasets.bbbc021_raw import prepare_bbbc021
from cellmorph.data.prepare import shrink_npy
from cellmorph.data.store import open_prepared


def reference_plate(image_csv: pd.DataFrame, folder, plate: str, treated_wells: set[str]):
    """The formulas, written out directly on whole float64 arrays (no tables, no histograms)."""
    rows = image_csv[image_csv.Image_Metadata_Plate_DAPI == plate]

    def load(r):  # the paper's RGB order: Actin, Tubulin, DAPI
        return np.stack([tifffile.imread(folder / r[f"Image_FileName_{c}"]) for c in ("Actin", "Tubulin", "DAPI")]).astype(np.float64)

    dmso = np.stack([load(r) for _, r in rows[rows.Image_Metadata_Compound == "DMSO"].iterrows()])
    a = 2.0 * np.sqrt(dmso + 3.0 / 8.0)
    mean = a.mean(axis=(0, 2, 3))
    std = a.std(axis=(0, 2, 3))
    out = []
    for _, r in rows[rows.Image_Metadata_Well_DAPI.isin(treated_wells)].iterrows():
        x = 2.0 * np.sqrt(load(r) + 3.0 / 8.0)
        x = (x - mean[:, None, None]) / std[:, None, None]
        xt = (x - x.min()) * 255.0 / (x.max() - x.min())
        h, w = x.shape[1] // 2, x.shape[2] // 2
        for top, left in [(0, 0), (0, w), (h, 0), (h, w)]:  # row by row
            crop = xt[:, top : top + h, left : left + w]
            keep = (crop > 255 / 5.1).sum() / crop.size > 0.002
            out.append((r.Image_Metadata_Well_DAPI, crop.astype(np.uint8), keep))
    return mean, std, out


@pytest.fixture(scope="module")
def synthetic_plate(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    im1, moa1 = write_bbbc021_plate(d / "bbbc021-raw", "Week1_00001", empty_quadrant_well="E05", shape=(64, 80))
    im2, moa2 = write_bbbc021_plate(d / "bbbc021-raw", "Week2_00002", treatments={"B05": ("AZ138", 1.0, "Eg5 inhibitors")}, seed=1, compress=True)
    image = pd.concat([im1, im2], ignore_index=True)
    write_bbbc021_metadata(d / "bbbc021-metadata", image, pd.concat([moa1, moa2]))
    recipe = prepare_bbbc021(d, d / "prepared", workers=2)
    return d, image, recipe


def test_prepare_matches_the_formulas(synthetic_plate):
    d, image, recipe = synthetic_plate
    store = open_prepared(d / "prepared")
    idx = store.index
    for plate, wells in [("Week1_00001", {"D03", "E05"}), ("Week2_00002", {"B05"})]:
        mean, std, ref = reference_plate(image, d / "bbbc021-raw" / plate, plate, wells)
        got = recipe["plates"][plate]
        np.testing.assert_allclose(list(got["control_anscombe_mean"].values()), mean, rtol=1e-6)
        np.testing.assert_allclose(list(got["control_anscombe_std"].values()), std, rtol=1e-6)
        kept = [(w, c) for w, c, k in ref if k]
        rows = np.flatnonzero((idx.Metadata_Plate == plate).to_numpy())
        assert len(rows) == len(kept)
        for i, (w, crop) in zip(rows, kept):
            assert idx.Metadata_Well.iloc[i] == w
            diff = np.abs(store.images[i].astype(int) - crop.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float64 summation order only
    # the synthetic E05 field has all its cells in the top-left quadrant: some crops must go, crop 1 must stay
    dropped = [x for x in recipe["crops_dropped"] if "/E05/" in x]
    assert dropped and not any(x.endswith("crop1") for x in dropped)
    assert len(idx) == 3 * 2 * 4 - len(recipe["crops_dropped"])
    assert store.images.shape[1:] == (3, 32, 40) and store.images.dtype == np.uint8
    assert set(idx.Metadata_MoA) == {"Microtubule stabilizers", "Eg5 inhibitors"}  # DMSO only normalises
    assert idx.groupby(["Metadata_Well", "Metadata_Site"]).Metadata_Crop.min().eq(1).all()


def test_tables_equal_direct_formula_exactly():
    rng = np.random.default_rng(3)
    field = rng.integers(0, 4000, size=(3, 40, 50), dtype=np.uint16)
    dmso = rng.integers(0, 4000, size=(3, 40, 50), dtype=np.uint16)
    stats = [anscombe_stats(pixel_histogram(dmso[c], 65536)) for c in range(3)]
    ztab = zscore_tables([m for m, _ in stats], [s for _, s in stats], 65536)
    crops, kept = normalize_field(field, ztab)
    m = np.array([s[0] for s in stats])[:, None, None]
    s = np.array([s[1] for s in stats])[:, None, None]
    x = (2.0 * np.sqrt(field.astype(np.float64) + 3.0 / 8.0) - m) / s  # same stats: isolates the per-pixel path
    xt = (x - x.min()) * 255.0 / (x.max() - x.min())
    for crop, (t, left, h, w) in zip(crops, tile_boxes(40, 50, (2, 2))):
        assert np.array_equal(crop, xt[:, t : t + h, left : left + w].astype(np.uint8))
    assert all(kept)


def test_near_empty_rule_boundary():
    # 1000 pixels in one channel; scaled value = raw value * 255 / 999 (min 0, max 999 -> 0..255)
    ztab = np.arange(65536, dtype=np.float64)[None]
    for n_above, expect_empty in [(2, True), (3, False)]:  # 0.2% of 1000 = 2 values may exceed 50
        field = np.zeros((1, 10, 100), np.uint16)
        field[0, 0, -1] = 999
        field[0, 0, : n_above - 1] = 500  # plus the maximum itself
        scaled = scaled_tables(field, ztab)
        assert near_empty(field, scaled, (0, 0, 10, 100)) is expect_empty


def test_shrink_npy_in_place(tmp_path):
    p = tmp_path / "a.npy"
    arr = np.lib.format.open_memmap(p, mode="w+", dtype=np.uint8, shape=(12345, 3, 4, 5))
    arr[:] = np.arange(12345 * 60, dtype=np.int64).reshape(arr.shape) % 251
    arr.flush()
    want = np.array(arr[:7])
    del arr
    shrink_npy(p, 7)
    got = np.load(p)
    assert got.shape == (7, 3, 4, 5) and np.array_equal(got, want)
