"""frozen.C = "auto": the head's C chosen per training fold on an inner split grouped like the protocol, recorded per
fold, through the real quickstart; refused where it does not apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold
from sklearn.preprocessing import StandardScaler

from cellmorph.config import load_config
from cellmorph.errors import CellmorphError
from cellmorph.models.features import C_GRID, choose_C, head_C


def _data(seed=0, n=240, d=40, groups=12):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), n // groups).astype(str)
    y = rng.permutation(np.arange(groups) % 3)[np.repeat(np.arange(groups), n // groups)]  # each group one class, as compounds are one MoA
    X = rng.normal(size=(n, d))
    X[:, 0] += y * 0.8 + rng.normal(0, 1.0, n)  # a weak signal, group offsets as nuisance
    X[:, 1:4] += rng.normal(0, 1.5, (groups, 3))[g.astype(int)]
    return X.astype(np.float32), y, g


def test_choose_C_picks_the_best_inner_balanced_accuracy_over_whole_groups():
    X, y, g = _data()
    got = choose_C(X, y, g, None, seed=0)
    assert got["inner_split"] == "3-fold inner split of whole groups" and set(got["inner_balanced_accuracy"]) == {f"{c:g}" for c in C_GRID}
    # the same scores, computed independently with scikit-learn on the same grouped split
    for C in C_GRID:
        pred = np.empty(len(y), int)
        for tr, te in GroupKFold(3).split(X, y, g):
            assert not set(g[tr]) & set(g[te]) and len(set(y[tr])) == 3  # whole groups; every class trained
            sc = StandardScaler().fit(X[tr])
            pred[te] = LogisticRegression(C=C, max_iter=3000, random_state=0).fit(sc.transform(X[tr]), y[tr]).predict(sc.transform(X[te]))
        bal = np.mean([(pred[y == k] == k).mean() for k in range(3)])
        assert got["inner_balanced_accuracy"][f"{C:g}"] == pytest.approx(bal, abs=1e-4)
    best = max(got["inner_balanced_accuracy"].values())
    assert got["inner_balanced_accuracy"][f"{got['C']:g}"] == best
    assert got["C"] == min(c for c in C_GRID if got["inner_balanced_accuracy"][f"{c:g}"] == best)  # ties: more regularisation


def test_without_groups_the_inner_split_is_stratified_and_a_number_passes_through():
    X, y, _ = _data(1)
    assert choose_C(X, y, None, "balanced", seed=0)["inner_split"] == "3-fold stratified inner split"
    C, cols, info = head_C(0.5, X, y, None, None, 0)
    assert (C, info) == (0.5, None) and np.array_equal(np.arange(X.shape[1])[cols], np.arange(X.shape[1]))
    C, cols, info = head_C("auto", X, y, None, None, 0)
    assert C in C_GRID and info["C"] == C and X[:, cols].shape == X.shape


def test_auto_features_choose_between_the_whole_vector_and_its_last_part():
    """frozen.features = "auto": the inner split scores both column sets at every C; with the class signal only in
    the first columns (the "stages" part), the whole vector wins; with it only in the tail, and the head columns
    noise, "last" (the tail alone) is at least as good and wins ties."""
    _, y, groups = _data(1)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(len(y), 6))
    X[:, :2] += 2.0 * np.eye(3)[y][:, :2]  # a clear class signal in 2 of 6 columns
    early = np.hstack([X, rng.normal(size=(len(X), 8))])  # signal in the leading columns, noise in the 8-column tail
    got = choose_C(early, y, groups, "balanced", 0, tail=8)
    assert got["features"] == "stages" and len(got["inner_balanced_accuracy"]) == 2 * len(C_GRID)
    assert set(got["inner_balanced_accuracy"]) == {f"{w} C={c:g}" for w in ("last", "stages") for c in C_GRID}
    C, cols, info = head_C(1.0, early, y, groups, "balanced", 0, "auto", 8)
    assert C == 1.0 and info["features"] == "stages" and early[:, cols].shape == early.shape
    late = np.hstack([rng.normal(size=(len(X), 8)), X])  # the signal in the tail
    C, cols, info = head_C("auto", late, y, groups, "balanced", 0, "auto", X.shape[1])
    assert info["features"] == "last" and np.array_equal(np.arange(late.shape[1])[cols], np.arange(8, late.shape[1]))


def test_auto_C_is_refused_under_lomo(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "x"\nmode = "frozen"\n[dataset]\nname = "bbbc021-subset"\n[frozen]\nC = "auto"\n[evaluation]\nprotocol = "lomo"\n')
    with pytest.raises(CellmorphError, match='frozen.C = "auto" is not available under the lomo protocol'):
        load_config(cfg)


@pytest.mark.realdata
def test_quickstart_with_auto_C_records_each_folds_choice(data_dir):
    from cellmorph.config import override
    from cellmorph.engine.runner import cross_validate_config

    quickstart = Path(__file__).resolve().parents[2] / "configs" / "quickstart.toml"
    cfg = override(load_config(quickstart), {"frozen.C": "auto"})
    m = cross_validate_config(cfg, data_dir=data_dir).metrics
    chosen = m.context["frozen_C_chosen"]
    assert len(chosen["per_fold"]) == 18 and set(chosen["per_fold"]) <= set(C_GRID)
    assert all(c["inner_split"] == "3-fold inner split of whole groups" for c in chosen["inner"])  # compounds kept whole
    assert m.level("treatment").total == 55 and m.level("treatment").correct >= 50


def test_the_report_shows_each_folds_inner_scores_with_the_choice_in_bold():
    from cellmorph.reporting.sections import inner_choice_html

    X, y, groups = _data(2)
    chosen = [choose_C(X, y, groups, "balanced", 0, tail=10), choose_C(X[::-1], y[::-1], groups[::-1], "balanced", 1, tail=10)]
    page = inner_choice_html({"frozen_C_chosen": {"inner": chosen}})
    assert "Recipe chosen inside each fold" in page and page.count("<tr>") == 3  # header + 2 folds
    for c in chosen:
        key = "{} C={:g}".format(c["features"], c["C"])
        assert "<b>{:.3f}</b>".format(c["inner_balanced_accuracy"][key]) in page
    assert inner_choice_html({}) == ""


def test_auto_features_are_refused_under_lomo(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('name = "x"\nmode = "frozen"\n[dataset]\nname = "bbbc021-subset"\n[frozen]\nfeatures = "auto"\nC = 1.0\n[evaluation]\nprotocol = "lomo"\n')
    with pytest.raises(CellmorphError, match='frozen.features = "auto" is not available under the lomo protocol'):
        load_config(cfg)
