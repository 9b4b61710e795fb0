"""Temperature scaling: it recovers a known over-confidence, fits each fold on the other folds only, and the
run's conformal block reports the ECE before and after with the prediction sets unchanged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellmorph.evaluation.calibration import cross_fitted, fit_temperature, temper
from cellmorph.evaluation.conformal import ece, evaluate


def _calibrated_sample(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are calibrated by construction: the true class is drawn from them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, size=(n, k))
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in p])
    return p, y


def test_temper_keeps_the_predicted_class_and_rows_summing_to_one():
    p, _ = _calibrated_sample(200, 4, 0)
    for t in (0.3, 1.0, 3.0):
        q = temper(p, t)
        assert np.allclose(q.sum(1), 1) and (q.argmax(1) == p.argmax(1)).all()
    assert np.allclose(temper(p, 1.0), p)
    assert (temper(p, 3.0).max(1) < p.max(1) + 1e-12).all()  # T > 1 softens


def test_fit_temperature_undoes_a_known_overconfidence():
    p, y = _calibrated_sample(4000, 4, 1)
    over = temper(p, 0.5)  # twice as sharp as the truth: over-confident
    t = fit_temperature(over, y)
    assert t == pytest.approx(2.0, rel=0.1)
    before, after = ece(over, y)[0], ece(temper(over, t), y)[0]
    assert before > 0.05 and after < before / 2


def test_cross_fitted_uses_only_the_other_folds():
    p, y = _calibrated_sample(600, 3, 2)
    over = temper(p, 0.6)
    folds = np.arange(600) % 3
    scaled, temps = cross_fitted(over, y, folds)
    for f, t in zip(range(3), temps):
        assert t == pytest.approx(fit_temperature(over[folds != f], y[folds != f]))
        assert np.allclose(scaled[folds == f], temper(over[folds == f], t))
    # a fold's own labels do not move its temperature: flipping them changes nothing in that fold
    y2 = y.copy()
    y2[folds == 0] = (y2[folds == 0] + 1) % 3
    scaled2, temps2 = cross_fitted(over, y2, folds)
    assert temps2[0] == pytest.approx(temps[0]) and np.allclose(scaled2[folds == 0], scaled[folds == 0])


def test_conformal_block_reports_ece_before_and_after_with_sets_unchanged():
    p, y = _calibrated_sample(900, 3, 3)
    over = temper(p, 0.5)
    classes = ["a", "b", "c"]
    pred = pd.DataFrame({"Metadata_Label": np.array(classes)[y], "Metadata_Group": [f"g{i % 30}" for i in range(900)],
                         **{f"prob_{c}": over[:, j] for j, c in enumerate(classes)}})
    block = evaluate(pred, "Metadata_Label", ["image"], group="Metadata_Group")
    lv = block["levels"]["image"]
    assert lv["ece"] == pytest.approx(ece(over, y)[0])
    assert lv["ece_scaled"] < lv["ece"] / 2 and lv["temperature"]["n_fits"] == 30
    assert lv["temperature"]["folds_min"] <= lv["temperature"]["all_units"] <= lv["temperature"]["folds_max"] * 1.05
    assert "ece_scaled" in block["temperature_scaling"]
    # the sets come from the unscaled probabilities (scaled ones would give other sets): coverage as before scaling
    from cellmorph.evaluation.conformal import cross_conformal_p_values, set_scores

    groups = pred["Metadata_Group"].to_numpy()
    unscaled = set_scores(cross_conformal_p_values(over, np.array(classes)[y], classes, groups)[0], y, classes)
    assert unscaled == lv["by_confidence"]
