"""The distance novelty score of `lomo` (cellmorph.evaluation.novelty, evaluation.novelty_score = "distance" |
"combined"): conformal p-values of the nearest-known-unit distance by hand, a constructed screen whose
novel MoA is far from every known one (AUROC 1 by construction), no distance computation ever seeing
the novel MoA or the scored compound (asserted on the row indices of every call), and a real run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellmorph.evaluation import lomo
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.lomo import lomo_folds, run_lomo
from cellmorph.evaluation.novelty import distance_p_values, nearest_distance, unit_profiles

REPO = Path(__file__).resolve().parents[2]
MOAS = ["A", "B", "C", "D"]


def _screen(rng, moas=MOAS, per_moa=3, dim=32):
    """A screen with 3 compounds per MoA, 2 concentrations, 2 plates (one well each), 3 images per
    well. Features: a MoA centre drawn N(0, 3^2) per dimension, a compound offset and image noise of
    SD 0.3: compounds of one MoA lie together (cosine ~0.98 after standardisation), MoAs far apart
    (random directions in 32 dimensions). Every dimension carries MoA signal: dimensions of pure
    noise would be blown up to unit scale by the standardisation."""
    rows, feats = [], []
    centres = rng.normal(0, 3, (len(moas), dim))
    for k, moa in enumerate(moas):
        for j in range(per_moa):
            cpd = f"{moa}{j}"
            offset = rng.normal(0, 0.3, dim)
            for conc in (0.1, 1.0):
                for plate in ("P1", "P2"):
                    for i in range(3):
                        rows.append({"Metadata_Plate": plate, "Metadata_Well": f"{cpd}-{conc}", "Metadata_Compound": cpd,
                                     "Metadata_Concentration": conc, "Metadata_Image": f"{plate}-{cpd}-{conc}-{i}", "Metadata_MoA": moa})
                        feats.append(centres[k] + offset + rng.normal(0, 0.3, dim))
    df = pd.DataFrame(rows)
    y = df["Metadata_MoA"].map({m: i for i, m in enumerate(sorted(moas))}).to_numpy()
    return df, np.array(feats, dtype=np.float32), y


def test_distance_p_values_by_the_rank_formula():
    cal = np.array([0.2, 0.3, 0.3, 0.5])
    got = distance_p_values(np.array([0.1, 0.3, 0.31, 0.9]), cal)
    np.testing.assert_allclose(got, [5 / 5, 4 / 5, 2 / 5, 1 / 5])  # (#{cal >= d} + 1) / (n + 1), ties count
    with pytest.raises(CellmorphError, match="no calibration distances"):
        distance_p_values(np.array([0.1]), np.array([]))


def test_nearest_distance_is_the_cosine_distance_of_standardised_profiles():
    rng = np.random.default_rng(0)
    df, feats, _ = _screen(rng)
    prof = unit_profiles(feats, df, "treatment", "Metadata_MoA")
    assert prof.profiles.shape == (24, 32) and len(prof.keys) == 24
    cpd = df["Metadata_Compound"].to_numpy()
    ref, test = np.flatnonzero(cpd != "A0"), np.flatnonzero(cpd == "A0")
    units, d = nearest_distance(feats, prof, ref, test)
    assert set(prof.keys["Metadata_Compound"].iloc[units]) == {"A0"} and len(units) == 2
    # by hand, in float64 as novelty.py computes (a float32 reference differs by ~1e-7 in 1 - cosine): the
    # treatment profile is the median over its 2 wells of the median over 3 images
    f64 = feats.astype(np.float64)
    mu, sd = f64[ref].mean(axis=0), f64[ref].std(axis=0)
    def profile(c, conc):
        wells = [np.median(f64[(cpd == c) & (df["Metadata_Concentration"] == conc).to_numpy() & (df["Metadata_Plate"] == p).to_numpy()], axis=0)
                 for p in ("P1", "P2")]
        z = (np.median(wells, axis=0) - mu) / sd
        return z / np.linalg.norm(z)
    refs = [(c, x) for c in sorted(set(cpd) - {"A0"}) for x in (0.1, 1.0)]
    expected = [1 - max(profile("A0", x) @ profile(c, xx) for c, xx in refs) for x in (0.1, 1.0)]
    np.testing.assert_allclose(d, expected, rtol=1e-9)
    with pytest.raises(CellmorphError, match="both the reference and the scored rows"):
        nearest_distance(feats, prof, np.arange(len(df)), test)


def test_far_novel_moa_is_flagged_with_auroc_one():
    df, feats, y = _screen(np.random.default_rng(1))
    folds = lomo_folds(df, "Metadata_MoA")
    _, block, units = run_lomo(feats, y, df, folds, sorted(MOAS), "Metadata_MoA", ["image", "well", "treatment"], "median",
                               1.0, "balanced", 0, novelty_score="distance")
    assert block["score"] == "distance" and "cosine" in block["novelty_score"] and block["distance"]["k"] == 1
    for lv in ("treatment", "well", "image"):
        r = block["overall"][lv]
        assert r["auroc"] == 1.0, (lv, r)
        assert r["novel_flagged"] == r["novel_units"]  # farther than every calibration unit: p = 1/(n+1) <= 0.1
        assert r["false_flag_rate"] <= 0.2
    t = units["treatment"]
    assert len(t) == 4 * 24 and (t.loc[t["role"] == "novel", "p_distance"] == 1 / 19).all()  # 9 known compounds x 2 treatments
    assert (t["flagged"] == (t["novelty"] >= 0.9 - 1e-12)).all()
    assert (t["flagged"] == t["flagged_distance"]).all() and {"flagged_softmax", "nn_distance"} <= set(t.columns)


def test_combined_flags_when_either_flags():
    df, feats, y = _screen(np.random.default_rng(2))
    folds = lomo_folds(df, "Metadata_MoA")
    _, block, units = run_lomo(feats, y, df, folds, sorted(MOAS), "Metadata_MoA", ["treatment"], "median", 1.0, "balanced", 0,
                               novelty_score="combined")
    t = units["treatment"]
    assert (t["flagged"] == (t["flagged_softmax"] | t["flagged_distance"])).all()
    np.testing.assert_allclose(t["novelty"], np.maximum(t["novelty_softmax"], t["novelty_distance"]))
    assert block["score"] == "combined" and block["overall"]["treatment"]["auroc"] == 1.0
    with pytest.raises(CellmorphError, match="novelty score 'knn' is not known"):
        run_lomo(feats, y, df, folds, sorted(MOAS), "Metadata_MoA", ["treatment"], "median", 1.0, "balanced", 0, novelty_score="knn")


def test_no_distance_computation_sees_the_novel_moa_or_the_scored_compound(subset_table, monkeypatch):
    """Every call of nearest_distance in the first real lomo round (novel = Aurora kinase inhibitors),
    recorded with the real function underneath: its reference rows hold neither the novel MoA nor any
    compound it scores, and every known compound is scored against references without it."""
    df = subset_table.df.reset_index(drop=True)
    moa, cpd = df["Metadata_MoA"].astype(str).to_numpy(), df["Metadata_Compound"].astype(str).to_numpy()
    folds = lomo_folds(df, "Metadata_MoA")[:16]  # one round: the novel fold + 15 known compounds
    novel = folds[0].novel
    calls = []
    real = lomo.nearest_distance

    def recording(features, prof, reference, test):
        calls.append((np.asarray(reference).copy(), np.asarray(test).copy()))
        return real(features, prof, reference, test)

    monkeypatch.setattr(lomo, "nearest_distance", recording)  # the name lomo calls
    classes = sorted(set(moa))
    y = np.array([classes.index(m) for m in moa])
    feats = np.random.default_rng(3).normal(size=(len(df), 6)).astype(np.float32)  # the indices matter here, not the values
    _, block, units = run_lomo(feats, y, df, folds, classes, "Metadata_MoA", ["treatment"], "median", 1.0, "balanced", 0,
                               novelty_score="distance")
    k = 15
    assert len(calls) == 1 + k + 2 * (k * (k - 1) // 2)  # novel, leave-one-compound-out, both sides of every pair
    for reference, test in calls:
        assert novel not in set(moa[reference])
        assert not set(cpd[reference]) & set(cpd[test])
    scored_novel = [t for _, t in calls if set(moa[t]) == {novel}]
    assert len(scored_novel) == 1 and set(scored_novel[0]) == set(np.flatnonzero(moa == novel))
    assert set(units["treatment"]["role"]) == {"novel", "known held-out"} and block["overall"]["treatment"]["novel_units"] == 12


def test_novelty_score_is_lomo_only_and_strict():
    from cellmorph.config import load_config

    with pytest.raises(CellmorphError, match="applies to protocol = 'lomo' only"):
        load_config(REPO / "configs" / "quickstart.toml", ["evaluation.novelty_score=distance"])
    with pytest.raises(CellmorphError, match="novelty_score"):
        load_config(REPO / "configs" / "lomo.toml", ["evaluation.novelty_score=knn"])
    assert load_config(REPO / "configs" / "lomo.toml").evaluation.novelty_score == "softmax"


@pytest.mark.slow
def test_lomo_distance_one_round_on_real_data(data_dir, tmp_path):
    # The first round only (novel = Aurora kinase inhibitors; 121 heads), real frozen EfficientNet-Lite0 features
    from cellmorph.config import load_config
    from cellmorph.engine.runner import run_experiment

    out = tmp_path / "lomo"
    m = run_experiment(load_config(REPO / "configs" / "lomo.toml", ["evaluation.max_folds=16", "evaluation.novelty_score=distance"]), out, data_dir)
    nov = m.novelty
    assert nov["score"] == "distance" and list(nov["per_moa"]) == ["Aurora kinase inhibitors"]
    r = nov["overall"]["treatment"]
    assert r["novel_units"] == 12 and r["known_units"] == 43 and 0 <= r["auroc"] <= 1
    units = pd.read_csv(out / "novelty_treatments.csv")
    assert (units["flagged"] == (units["p_distance"] <= 0.1 + 1e-12)).all()
    assert units["nn_distance"].between(0, 2).all()
    assert (units.loc[units["role"] == "novel", "p_distance"] >= 1 / 44 - 1e-12).all()  # 15 known compounds: 43 calibration treatments
    assert "Novel mechanisms" in (out / "report.html").read_text() and (out / "novelty.png").is_file()
