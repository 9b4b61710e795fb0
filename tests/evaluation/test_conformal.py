"""Conformal prediction (cellmorph.evaluation.conformal) and the lomo protocol (cellmorph.evaluation.novelty): the coverage
guarantee on synthetic exchangeable data, Mondrian vs pooled calibration, bad input, the conformal
block of a real quickstart run, and lomo's folds never training on the novel MoA or the test compound."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellmorph.evaluation.conformal import Calibrator, combine, ece, evaluate, in_set, level_table
from cellmorph.errors import CellmorphError

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["a", "b", "c"]


def _draw(rng, n, hard_class=None):
    """n units with Dirichlet probabilities and a true class drawn from them (exchangeable draws);
    `hard_class`: that class's true units get a third of their probability for it (the model
    under-rates that class, so its scores are worse than the others')."""
    probs = rng.dirichlet([1.0, 1.0, 1.0], size=n)
    y = (rng.uniform(size=(n, 1)) > probs.cumsum(axis=1)).sum(axis=1)  # a class drawn from each row's probabilities
    if hard_class is not None:
        hard = y == hard_class
        probs[hard, hard_class] /= 3
        probs[hard] /= probs[hard].sum(axis=1, keepdims=True)
    return probs, np.array(CLASSES)[y]


def test_marginal_coverage_is_exact_for_non_smoothed_p_values():
    # With n = 19 calibration units and continuous scores, the p-value of the true class is uniform on
    # {1/20, ..., 20/20}: the set {p > 0.1} covers with probability exactly 18/20 = 0.9. Off-by-one
    # formulas give 0.85 (#>=/(n+1)) or 0.95 (p >= 0.1, or (#>= + 1)/n): the tolerance separates them.
    rng = np.random.default_rng(0)
    covered, total = 0, 0
    for _ in range(700):
        p_cal, y_cal = _draw(rng, 19)
        p_test, y_test = _draw(rng, 10)
        cal = Calibrator.fit(p_cal, y_cal, CLASSES)
        sets = cal.prediction_sets(p_test, 0.9)
        covered += sets[np.arange(10), [CLASSES.index(v) for v in y_test]].sum()
        total += 10
    assert abs(covered / total - 0.9) < 0.02, covered / total  # SE about 0.005 over 7,000 units


def test_p_values_match_the_rank_formula():
    rng = np.random.default_rng(1)
    p_cal, y_cal = _draw(rng, 30)
    cal = Calibrator.fit(p_cal, y_cal, CLASSES)
    p_test, _ = _draw(rng, 5)
    scores = 1 - p_cal[np.arange(30), [CLASSES.index(v) for v in y_cal]]
    expected = np.array([[((scores >= 1 - p_test[i, k]).sum() + 1) / 31 for k in range(3)] for i in range(5)])
    np.testing.assert_allclose(cal.p_values(p_test), expected)
    np.testing.assert_allclose(cal.novelty(p_test), 1 - expected.max(axis=1))


def test_in_set_is_exact_at_a_tie():
    # 2/20 = 0.1 is not > 1 - 0.9, although 1 - 0.9 == 0.09999999999999998 in floating point
    assert not in_set(np.array([2 / 20]), 0.9)[0]
    assert in_set(np.array([3 / 20]), 0.9)[0]


def test_mondrian_covers_each_class_where_pooled_does_not():
    # class "c" is hard (flattened probabilities): pooled calibration under-covers it, Mondrian does not
    rng = np.random.default_rng(2)
    cov = {"pooled": [], "mondrian": []}
    for _ in range(60):
        p_cal, y_cal = _draw(rng, 300, hard_class=2)
        p_test, y_test = _draw(rng, 100, hard_class=2)
        hard = y_test == "c"
        for name, k in (("pooled", 10_000), ("mondrian", 20)):
            cal = Calibrator.fit(p_cal, y_cal, CLASSES, min_per_class=k)
            assert cal.describe()["method"] == ("pooled (marginal)" if name == "pooled" else "mondrian (class-conditional)")
            sets = cal.prediction_sets(p_test[hard], 0.9)
            cov[name].append(sets[:, 2].mean())
    assert np.mean(cov["mondrian"]) >= 0.88
    assert np.mean(cov["pooled"]) < 0.85


def test_small_classes_share_one_pooled_bin_counted_in_groups():
    rng = np.random.default_rng(3)
    p, y = _draw(rng, 400)
    # "a" gets 25 distinct groups, "b" and "c" share 5: only "a" has a bin of its own
    groups = np.where(y == "a", np.arange(400) % 25, np.arange(400) % 5).astype(str)
    groups = np.char.add(y.astype(str), groups)
    cal = Calibrator.fit(p, y, CLASSES, min_per_class=20, groups=groups)
    d = cal.describe()
    assert d["classes"]["a"]["bin"] == "own" and d["classes"]["b"]["bin"] == "pooled" and d["classes"]["c"]["bin"] == "pooled"
    assert d["classes"]["a"]["groups"] == 25 and d["library"].startswith("crepes")
    assert d["method"].startswith("mondrian for a")
    # "b" is calibrated against the scores of the b and c units together
    q = np.array([[0.2, 0.5, 0.3]])
    pooled = 1 - np.concatenate([p[y == "b", 1], p[y == "c", 2]])
    assert cal.p_values(q)[0, 1] == pytest.approx(((pooled >= 0.5).sum() + 1) / (len(pooled) + 1))


@pytest.mark.parametrize(
    "probs, y, classes, match",
    [
        (np.full((3, 3), 1 / 3), [None, "", np.nan], CLASSES, "none of the calibration units has a label"),
        (np.full((3, 3), 1 / 3), ["a", "b", "zebra"], CLASSES, r"\['zebra'\] are not among the model's classes"),
        (np.full((3, 2), 0.5), ["a", "b", "c"], CLASSES, "n x 3 array"),
        (np.full((2, 3), np.nan), ["a", "b"], CLASSES, "NaN"),
    ],
)
def test_bad_calibration_input_is_one_clear_error(probs, y, classes, match):
    with pytest.raises(CellmorphError, match=match):
        Calibrator.fit(probs, np.array(y, dtype=object), classes)


def test_bad_confidence_is_a_clear_error():
    rng = np.random.default_rng(4)
    cal = Calibrator.fit(*_draw(rng, 20), CLASSES)
    with pytest.raises(CellmorphError, match="strictly between 0 and 1"):
        cal.prediction_sets(np.full((1, 3), 1 / 3), 90)


def test_ece_by_hand():
    e, table = ece(np.array([[0.9, 0.1], [0.6, 0.4], [0.95, 0.05]]), np.array([0, 1, 0]))
    # bins: [0.5, 0.6]: one wrong at 0.6; (0.9, 1.0]: two right at 0.925 (0.9 falls in (0.8, 0.9])
    assert e == pytest.approx((abs(0 - 0.6) + abs(1 - 0.9) + abs(1 - 0.95)) / 3)
    assert sum(r["n"] for r in table) == 3


def _synthetic_screen(rng, n_compounds=12, seed=None) -> pd.DataFrame:
    """Image predictions of a fake screen: 4 images x 2 wells x 2 concentrations per compound."""
    rows = []
    for k in range(n_compounds):
        moa = CLASSES[k % 3]
        for conc in (0.1, 1.0):
            for w in range(2):
                for _ in range(4):
                    p = rng.dirichlet([1, 1, 1]) * 0.5
                    p[k % 3] += 0.5 * rng.uniform(0.3, 1.0)
                    p /= p.sum()
                    rows.append({"Metadata_Plate": f"P{w}", "Metadata_Well": f"W{k}{conc}", "Metadata_Compound": f"cpd{k}",
                                 "Metadata_Concentration": conc, "Metadata_MoA": moa, **{f"prob_{c}": v for c, v in zip(CLASSES, p)}})
    df = pd.DataFrame(rows)
    return df if seed is None else df.assign(seed=seed)


def test_evaluate_scores_every_level_grouped_by_compound():
    pred = _synthetic_screen(np.random.default_rng(5))
    block = evaluate(pred, "Metadata_MoA", ["image", "well", "treatment"], group="Metadata_Compound")
    assert set(block["levels"]) == {"image", "well", "treatment"} and not block["skipped"]
    t = block["levels"]["treatment"]
    assert t["n_units"] == 24 and t["n_groups"] == 12 and t["n_calibrations"] == 12
    for c in ("0.8", "0.9", "0.95"):
        b = t["by_confidence"][c]
        assert b["total"] == 24 and 0 <= b["covered"] <= 24 and b["coverage"] == pytest.approx(b["covered"] / 24)
    # higher confidence: sets never shrink
    assert t["by_confidence"]["0.8"]["mean_set_size"] <= t["by_confidence"]["0.9"]["mean_set_size"] <= t["by_confidence"]["0.95"]["mean_set_size"]
    assert block["levels"]["image"]["by_confidence"]["0.9"]["total"] == len(pred)
    # a group column the units lack: that level is skipped with the reason, not fatal
    skipped = evaluate(pred, "Metadata_MoA", ["treatment"], group="Metadata_Plate")
    assert "Metadata_Plate" in skipped["skipped"]["treatment"] and not skipped["levels"]


def test_combine_two_seeds_means_and_sems():
    rng = np.random.default_rng(6)
    blocks = [evaluate(_synthetic_screen(rng), "Metadata_MoA", ["treatment"], group="Metadata_Compound") for _ in range(2)]
    both = combine(blocks)
    covs = [b["levels"]["treatment"]["by_confidence"]["0.9"]["coverage"] for b in blocks]
    got = both["levels"]["treatment"]["by_confidence"]["0.9"]
    assert got["coverage"] == pytest.approx(np.mean(covs))
    assert got["coverage_sem"] == pytest.approx(np.std(covs, ddof=1) / np.sqrt(2))
    assert got["total"] == 48 and both["n_seeds"] == 2


def test_level_table_of_unlabelled_predictions():
    pred = _synthetic_screen(np.random.default_rng(7)).drop(columns="Metadata_MoA")
    units = level_table(pred, "Metadata_MoA", "treatment")
    assert len(units) == 24 and units["Metadata_MoA"].isna().all() and {"n", "predicted", "prob_a"} <= set(units.columns)


# --- lomo: folds ------------------------------------------------------------------------------------


def test_lomo_folds_never_train_on_the_novel_moa_or_the_test_compound(subset_table):
    from cellmorph.config import EvaluationConfig
    from cellmorph.evaluation.lomo import NovelFold, nested_folds
    from cellmorph.evaluation.protocols import make_folds

    df = subset_table.df
    folds, excluded, text = make_folds(df, "Metadata_MoA", EvaluationConfig(protocol="lomo"))
    moa = df["Metadata_MoA"].astype(str).to_numpy()
    cpd = df["Metadata_Compound"].astype(str).to_numpy()
    assert not excluded and all(isinstance(f, NovelFold) for f in folds)
    moas = sorted(set(moa))
    # per MoA: one novel fold + one fold per known compound
    assert len(folds) == sum(1 + len(set(cpd[moa != m])) for m in moas) == 96
    assert "leave-one-MoA-out" in text
    for f in folds:
        assert f.novel not in set(moa[f.train])
        assert not set(cpd[f.train]) & set(cpd[f.test])
        if f.held_out:
            assert set(cpd[f.test]) == {f.held_out} and f.novel not in set(moa[f.test])
        else:
            assert set(moa[f.test]) == {f.novel}
    # nested calibration folds: neither the novel MoA, nor the pair held out, nor (so) the test compound
    for m in moas:
        rnd = [f for f in folds if f.novel == m]
        pairs = nested_folds(rnd[0], rnd[1:], cpd)
        k = len(rnd) - 1
        assert len(pairs) == k * (k - 1) // 2
        for p in pairs:
            c, d = p.held_out.split("|")
            assert m not in set(moa[p.train])
            assert not {c, d} & set(cpd[p.train])
            assert set(cpd[p.test]) == {c, d}


def test_lomo_refuses_finetune(data_dir):
    from cellmorph.config import load_config
    from cellmorph.engine.runner import plan_run

    cfg = load_config(REPO / "configs" / "lomo.toml", ["mode=finetune"])
    with pytest.raises(CellmorphError, match="needs mode = \"frozen\""):
        plan_run(cfg, data_dir)


# --- real runs ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_quickstart_run_has_a_sane_conformal_block(data_dir, tmp_path):
    from cellmorph.config import load_config
    from cellmorph.engine.runner import run_experiment
    from cellmorph.evaluation.metrics import Metrics

    out = tmp_path / "qs"
    run_experiment(load_config(REPO / "configs" / "quickstart.toml"), out, data_dir)
    m = Metrics.read(out / "metrics.json")
    block = m.conformal
    assert block["group"] == "Metadata_Compound" and block["library"].startswith("crepes")
    totals = {"treatment": 55, "well": 165, "image": 660}
    for lv, n in totals.items():
        s = block["levels"][lv]
        assert s["n_units"] == n and s["n_groups"] == 18 and 0 <= s["ece"] <= 0.5
        covs = [s["by_confidence"][c]["coverage"] for c in ("0.8", "0.9", "0.95")]
        assert covs == sorted(covs) and all(0.6 <= c <= 1 for c in covs)
        assert 0 < s["by_confidence"]["0.9"]["mean_set_size"] <= 3
        assert s["by_confidence"]["0.9"]["total"] == n
    assert (out / "coverage.png").stat().st_size > 10_000 and (out / "reliability.png").stat().st_size > 10_000
    html = (out / "report.html").read_text()
    assert "Conformal prediction sets" in html and 'src="coverage.png"' in html and 'src="reliability.png"' in html
    raw = json.loads((out / "metrics.json").read_text())
    assert raw["conformal"]["levels"]["treatment"]["by_confidence"]["0.9"]["total"] == 55


@pytest.mark.slow
def test_lomo_one_round_on_real_data(data_dir, tmp_path):
    # The first round only (novel = Aurora kinase inhibitors: 1 novel fold + 15 known folds; 121 heads)
    from cellmorph.config import load_config
    from cellmorph.engine.runner import run_experiment

    out = tmp_path / "lomo"
    m = run_experiment(load_config(REPO / "configs" / "lomo.toml", ["evaluation.max_folds=16"]), out, data_dir)
    nov = m.novelty
    assert list(nov["per_moa"]) == ["Aurora kinase inhibitors"]
    r = nov["overall"]["treatment"]
    assert r["novel_units"] == 12 and r["known_units"] == 43  # 55 treatments, 12 of them Aurora
    assert 0 <= r["auroc"] <= 1 and 0 <= r["false_flag_rate"] <= 1
    units = pd.read_csv(out / "novelty_treatments.csv")
    assert set(units["role"]) == {"novel", "known held-out"}
    assert (units["flagged"] == (units["novelty"] >= 0.9 - 1e-12)).all()
    assert m.levels["treatment"].total == 43
    assert "Novel mechanisms" in (out / "report.html").read_text() and (out / "novelty.png").is_file()
