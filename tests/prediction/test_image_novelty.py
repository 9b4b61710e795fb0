"""Image-level "none of the known" and QC (issue 24, item 2): garbage images predicted through the quickstart's
final model (frozen EfficientNet-Lite0 on the real BBBC021 subset) are flagged, real ones are not; the bundle's
image reference is checked on load; the QC numbers flag blank, saturated and blurred real fields."""

from __future__ import annotations

import glob
import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter

import cellmorph as cm
from cellmorph.cli import main
from cellmorph.config import ModelConfig
from cellmorph.data import quality
from cellmorph.data.store import open_store
from cellmorph.data.table import ImageTable
from cellmorph.models.features import extract_features
from cellmorph.data.quality import focus_threshold, image_qc, intensity_profile, qc_flags
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.novelty import image_distances, image_reference


def _subset_pngs(data_dir, n):
    files = sorted(glob.glob(str(data_dir / "bbbc021-subset" / "images" / "*.png")))
    return [np.asarray(Image.open(f).convert("RGB")) for f in files[: n * 7 : 7]]


def test_qc_flags_blank_saturated_and_blurred_real_fields(data_dir):
    real = _subset_pngs(data_dir, 12)
    x = np.stack([im.transpose(2, 0, 1) for im in real])
    blurred = np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(4))).transpose(2, 0, 1) for im in real[:4]])
    saturated = x[:2].copy()
    saturated[:, 1] = 255
    blank = np.full((2, 3, 256, 256), 37, np.uint8)
    qc_real = image_qc(x)
    thr = focus_threshold(qc_real["qc_focus"])
    flags = {k: qc_flags(image_qc(v), thr) for k, v in (("real", x), ("blurred", blurred), ("saturated", saturated), ("blank", blank))}
    print({k: {f: int(v.sum()) for f, v in fl.items()} for k, fl in flags.items()}, "focus threshold", round(thr, 2))
    assert not any(v.any() for v in flags["real"].values())
    assert flags["blurred"]["out_of_focus"].all() and flags["saturated"]["saturated"].all() and flags["blank"]["blank"].all()
    assert not flags["blank"]["out_of_focus"].any()  # a blank field is blank, not out of focus
    assert not qc_flags(image_qc(blurred))["out_of_focus"].any()  # no training threshold: never flagged


@pytest.mark.slow
def test_garbage_images_are_flagged_by_the_quickstart_bundle(quick_run, data_dir, tmp_path, monkeypatch, capsys):
    """Flat grey, uniform noise and colour-inverted fields through `cellmorph predict` (a folder of files: image-only
    data): every grey one QC-flagged blank, every noise one flagged none-of-known by its image distance; the real
    fields (training images of the bundle) are neither."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, im in enumerate(_subset_pngs(data_dir, 6)):
        Image.fromarray(im).save(folder / f"real{i}.png")
        Image.fromarray(np.full((256, 256, 3), rng.integers(20, 230), np.uint8)).save(folder / f"grey{i}.png")
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"noise{i}.png")
        Image.fromarray(255 - im).save(folder / f"inverted{i}.png")
    out = tmp_path / "pred"
    monkeypatch.setattr(sys, "argv", ["cellmorph", "predict", str(quick_run / "model"), str(folder), "--out", str(out), "--novelty", "distance"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None), capsys.readouterr().err
    p = pd.read_parquet(out / "predictions.parquet")
    kind = p["Metadata_FileName"].str.extract(r"^([a-z]+)")[0]
    print(p.assign(kind=kind).groupby("kind")[["distance_pvalue", "qc_std", "qc_focus"]].agg(["min", "max"]).round(4).to_string())
    assert {"qc_std", "qc_saturated", "qc_focus", "qc_flags", "distance", "distance_pvalue", "flagged_by", "none_of_known"} <= set(p.columns)
    assert not [c for c in p.columns if c.startswith("feature")]  # per image: a few numbers, never the features
    assert (p.loc[kind == "grey", "qc_flags"] == "blank").all() and (p.loc[kind != "grey", "qc_flags"] == "").all()
    assert p.loc[kind == "noise", "none_of_known"].all() and (p.loc[kind == "noise", "distance_pvalue"] <= 0.1).all()
    assert p.loc[kind == "inverted", "none_of_known"].all()  # bright background: the intensity profile is unlike any training field's
    assert not p.loc[kind == "real", "none_of_known"].any()
    info = json.loads((out / "predict.json").read_text())
    img = info["novelty"]["image"]
    assert img["score"] == "distance" and img["groups_left_out"] == "Metadata_Compound" and img["reference_images"] == 660
    assert "intensity profile" in img["distance"]
    assert img["qc"]["flagged"]["blank"] == 6 and img["qc"]["focus_min"] > 0
    html = (out / "report.html").read_text()
    assert "blank" in html and "QC" in html


@pytest.mark.slow
def test_image_reference_is_checked_on_load(quick_run, tmp_path):
    clf = cm.Classifier.load(quick_run / "model")
    ref = clf.image_reference
    assert ref["features"].dtype == np.float16 and ref["features"].shape == (660, 1280) and int(ref["version"]) == 2
    assert len(ref["calibration"]) == 660 and str(ref["feature_space"]) == "frozen backbone features" and str(ref["metric"]) == "cosine_raw"
    assert ref["profiles"].shape == (660, 15) and len(ref["profile_calibration"]) == len(ref["combined_calibration"]) == 660
    clf.image_reference = dict(ref, profiles=ref["profiles"][:10])
    clf.save(tmp_path / "short-profiles")
    with pytest.raises(CellmorphError, match="intensity profiles of inconsistent shapes"):
        cm.Classifier.load(tmp_path / "short-profiles")
    clf.image_reference = dict(ref, metric=np.array("euclid"))
    clf.save(tmp_path / "other-metric")
    with pytest.raises(CellmorphError, match="damaged image reference"):
        cm.Classifier.load(tmp_path / "other-metric")
    newer = dict(ref, version=np.array(3))
    clf.image_reference = newer
    clf.save(tmp_path / "newer")
    with pytest.raises(CellmorphError, match="image reference version 3, made by a newer cellmorph"):
        cm.Classifier.load(tmp_path / "newer")
    clf.image_reference = dict(ref, features=ref["features"][:, :100])
    clf.save(tmp_path / "narrow")
    with pytest.raises(CellmorphError, match="features of width 100, but the network gives 1280"):
        cm.Classifier.load(tmp_path / "narrow")


def test_training_qc_is_computed_in_the_feature_pass_and_cached(subset_table, tmp_path, monkeypatch):
    """The final model's out-of-focus threshold needs every training image's QC numbers: the frozen feature pass leaves
    them in the cache (one decode), a warm run reads them back, and a changed cache file is computed again."""
    table = ImageTable(subset_table.df.iloc[:24].reset_index(drop=True), name="subset-24", label=subset_table.label, source="test")
    store = open_store(table, 0, cache=tmp_path)
    direct = quality.qc_of_batches(store.batches(7))
    assert quality.cached_store_qc(store) is None
    extract_features(store, ModelConfig(name="tf_efficientnet_lite0", init="imagenet", input_size=64), tta=False, batch_size=8,
                     device=torch.device("cpu"), cache=tmp_path)
    cached = quality.cached_store_qc(store)
    assert cached is not None and all(np.array_equal(cached[k], direct[k]) for k in (*quality.QC_COLUMNS, "profile"))
    assert cached["profile"].shape == (24, 3 * len(quality.PROFILE_QUANTILES))

    monkeypatch.setattr(quality, "qc_of_batches", lambda *a, **k: pytest.fail("decoded the images again"))
    assert np.array_equal(quality.store_qc(store)["qc_focus"], direct["qc_focus"])  # warm: from the cache
    monkeypatch.undo()

    path = quality.qc_cache_path(store)
    path.write_bytes(path.read_bytes()[:-8] + b"\x00" * 8)  # bytes changed behind cellmorph's back
    assert quality.cached_store_qc(store) is None
    assert np.array_equal(quality.store_qc(store)["qc_std"], direct["qc_std"])


def test_intensity_profile_is_exact_per_channel_percentiles(data_dir):
    """The histogram-based profile equals numpy's lower percentiles of each channel of real fields."""
    x = np.stack([im.transpose(2, 0, 1) for im in _subset_pngs(data_dir, 3)])
    prof = intensity_profile(x).reshape(3, 3, -1)
    want = np.quantile(x.reshape(3, 3, -1), quality.PROFILE_QUANTILES, axis=2, method="inverted_cdf").transpose(1, 2, 0) / 255
    assert np.allclose(prof, want, atol=1e-6)


def test_combined_image_score_keeps_its_level_and_sees_intensity_shifts():
    """Exchangeable images (features and profiles from one distribution, in groups): about 10% flagged at 0.9 by the
    combined score, as by the feature distance alone; images whose features are typical but whose intensities are
    shifted: flagged by the combined score only."""
    rng = np.random.default_rng(0)
    n = 1200
    feats = rng.normal(size=(n, 32)) + 3.0
    profiles = rng.normal(size=(n, 15)) * 0.05 + 0.3
    groups = np.repeat(np.arange(n // 20), 20)
    ref = image_reference(feats[:800], groups[:800], "Metadata_Compound", "test", profiles=profiles[:800])
    _, p_feat = image_distances({k: v for k, v in ref.items() if k != "profiles"}, feats[800:])
    _, p = image_distances(ref, feats[800:], profiles[800:])
    print("false flags at 0.9: features", (p_feat <= 0.1).mean(), "combined", (p <= 0.1).mean())
    assert 0.05 <= (p <= 0.1).mean() <= 0.15 and 0.05 <= (p_feat <= 0.1).mean() <= 0.15
    _, p_shift_feat = image_distances({k: v for k, v in ref.items() if k != "profiles"}, feats[800:850])
    _, p_shift = image_distances(ref, feats[800:850], profiles[800:850] + 0.5)
    assert (p_shift <= 0.1).all() and (p_shift_feat <= 0.1).mean() < 0.3
