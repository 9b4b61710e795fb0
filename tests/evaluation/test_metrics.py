from pathlib import Path
"""Typed metrics: levels, counts, balanced accuracy and macro-F1, metrics.json, seeds, summary, report."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, precision_recall_fscore_support

from cellmorph.errors import CellmorphError
from cellmorph.evaluation.metrics import Metrics, aggregate, available_levels, combine_seeds, compute_metrics

REPO = Path(__file__).resolve().parents[2]

COLS = ["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "prob_A", "prob_B", "prob_C"]
# (plate, well, compound, concentration, true MoA, [image probabilities A, B, C], ...): two images per well,
# every treatment on both plates, and the same well names on both plates (B02 is two wells, not one).
SCREEN = [
    ("P1", "B02", "c1", 1.0, "A", [(0.7, 0.2, 0.1), (0.6, 0.3, 0.1)]),  # images A, A; well A
    ("P2", "B02", "c1", 1.0, "A", [(0.2, 0.7, 0.1), (0.5, 0.4, 0.1)]),  # images B, A; well (.35,.55,.1) B
    ("P1", "B03", "c1", 2.0, "A", [(0.1, 0.8, 0.1), (0.2, 0.7, 0.1)]),  # B, B; well B
    ("P2", "B03", "c1", 2.0, "A", [(0.3, 0.6, 0.1), (0.2, 0.5, 0.3)]),  # B, B; well B
    ("P1", "C02", "c2", 1.0, "B", [(0.1, 0.8, 0.1), (0.1, 0.7, 0.2)]),  # B, B; well B
    ("P2", "C02", "c2", 1.0, "B", [(0.1, 0.6, 0.3), (0.2, 0.6, 0.2)]),  # B, B; well B
    ("P1", "D02", "c3", 1.0, "C", [(0.1, 0.1, 0.8), (0.6, 0.1, 0.3)]),  # C, A; well (.35,.1,.55) C
    ("P2", "D02", "c3", 1.0, "C", [(0.1, 0.2, 0.7), (0.2, 0.2, 0.6)]),  # C, C; well C
]


def screen(unlabelled=None) -> pd.DataFrame:
    rows = [[p, w, c, conc, y, *probs] for p, w, c, conc, y, imgs in SCREEN for probs in imgs]
    if unlabelled is not None:  # a middle dose: predicted (confidently A), never scored
        rows += [["P1", "E02", "c4", 1.0, unlabelled, 0.9, 0.05, 0.05]] * 2
    return pd.DataFrame(rows, columns=COLS)


def nuclei(pred_a: list[float], truth: str = "AABB") -> pd.DataFrame:
    a = np.array(pred_a)
    return pd.DataFrame({"Metadata_Label": list(truth), "prob_A": a, "prob_B": 1 - a})


def test_screen_by_hand():
    m = compute_metrics(screen(), "Metadata_MoA", "loco", "leave one compound out")
    assert list(m.levels) == ["image", "well", "treatment"] and m.headline_level == "treatment"
    assert m.classes == ["A", "B", "C"]
    img, well, treat = m.level("image"), m.level("well"), m.level("treatment")
    # images: A 3/8 right, B 4/4, C 3/4; predicted A 4 times (3 right), B 9 times (4 right), C 3 times (3 right)
    assert (img.correct, img.total) == (10, 16) and img.accuracy == 0.625
    assert img.balanced_accuracy == pytest.approx((3 / 8 + 1 + 3 / 4) / 3)
    assert img.macro_f1 == pytest.approx((2 * 3 / 12 + 2 * 4 / 13 + 2 * 3 / 7) / 3)
    assert img.per_class["B"] == pytest.approx({"support": 4, "recall": 1.0, "precision": 4 / 9, "f1": 8 / 13})
    assert img.misclassified == []
    # wells (per plate: 8, not 4): A wells 1/4 right, B 2/2, C 2/2
    assert (well.correct, well.total) == (5, 8) and well.balanced_accuracy == pytest.approx(0.75)
    assert sorted((w["plate"], w["well"]) for w in well.misclassified) == [("P1", "B03"), ("P2", "B02"), ("P2", "B03")]
    # treatments, median over the two wells: c1@1 (.5,.4,.1) A right; c1@2 B wrong; c2 B; c3 C
    assert (treat.correct, treat.total) == (3, 4) and treat.accuracy == 0.75
    assert treat.balanced_accuracy == pytest.approx((0.5 + 1 + 1) / 3)
    assert treat.macro_f1 == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    assert treat.misclassified == [{"compound": "c1", "concentration": 2.0, "true": "A", "predicted": "B"}]
    assert "treatment accuracy 75.0% (3/4), balanced 83.3%, macro-F1 0.778; image accuracy 62.5% (10/16)" in m.summary_line()
    assert m.summary_line().endswith("(loco)")


def test_aggregate_units():
    wells = aggregate(screen(), "well", "Metadata_MoA")
    assert len(wells) == 8 and set(wells["n"]) == {2}
    w = wells[(wells.Metadata_Plate == "P2") & (wells.Metadata_Well == "B02")].iloc[0]
    assert (w.prob_A, w.prob_B, w.predicted) == (pytest.approx(0.35), pytest.approx(0.55), "B")
    treat = aggregate(screen(), "treatment", "Metadata_MoA")
    assert list(treat["n"]) == [2, 2, 2, 2]  # wells per treatment
    mean = aggregate(screen(), "well", "Metadata_MoA", how="mean")
    assert mean[(mean.Metadata_Plate == "P1") & (mean.Metadata_Well == "D02")].prob_A.iloc[0] == pytest.approx(0.35)
    with pytest.raises(CellmorphError, match="median"):
        aggregate(screen(), "well", "Metadata_MoA", how="mode")


@pytest.mark.parametrize("missing", [None, np.nan, ""])
def test_unlabelled_rows_are_not_scored(missing):
    m = compute_metrics(screen(unlabelled=missing), "Metadata_MoA", "loco")
    assert m.level("image").total == 16 and m.level("well").total == 8 and m.level("treatment").total == 4
    assert m.level("image").correct == 10  # the two confident A images of c4 would have changed this
    assert all(w["compound"] != "c4" for w in m.level("treatment").misclassified)


def test_levels_follow_the_columns():
    m = compute_metrics(nuclei([0.9, 0.2, 0.1, 0.3]), "Metadata_Label", "random")
    assert list(m.levels) == ["image"] and m.headline_level == "image"
    assert (m.level("image").correct, m.level("image").total) == (3, 4)
    assert m.level("image").per_class["A"]["recall"] == 0.5 and m.level("image").per_class["B"]["recall"] == 1.0
    with pytest.raises(CellmorphError, match="no 'treatment' level.*scored image"):
        m.level("treatment")
    assert m.summary_line().startswith("image accuracy 75.0% (3/4)")
    wells_only = screen().drop(columns=["Metadata_Compound", "Metadata_Concentration"])
    assert available_levels(wells_only) == ["image", "well"]
    assert available_levels(screen(), ["treatment", "image"]) == ["image", "treatment"]
    with pytest.raises(CellmorphError, match="Metadata_Compound, Metadata_Concentration"):
        available_levels(wells_only, ["treatment"])
    with pytest.raises(CellmorphError, match="'plate'.*image, well, treatment"):
        available_levels(screen(), ["plate"])
    only = compute_metrics(screen(), "Metadata_MoA", "loco", levels=["image", "treatment"])
    assert list(only.levels) == ["image", "treatment"]


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_balanced_accuracy_and_macro_f1_match_sklearn():
    rng = np.random.default_rng(3)
    classes = ["a", "b", "c", "d"]
    truth = rng.choice(["a", "b", "c"], size=200, p=[0.6, 0.3, 0.1])  # "d" only ever predicted
    logits = rng.normal(size=(200, 4))
    logits[np.arange(200), [classes.index(t) for t in truth]] += 1.0
    logits[:, 2] -= 3.0  # "c" rarely predicted
    pred = pd.DataFrame({"Metadata_Label": truth, **{f"prob_{c}": logits[:, i] for i, c in enumerate(classes)}})
    predicted = np.array(classes)[logits.argmax(1)]
    s = compute_metrics(pred, "Metadata_Label", "random").level("image")
    assert s.balanced_accuracy == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert s.macro_f1 == pytest.approx(f1_score(truth, predicted, average="macro", zero_division=0))
    assert s.accuracy == pytest.approx((truth == predicted).mean())
    p, r, f, n = precision_recall_fscore_support(truth, predicted, labels=["a", "b", "c"], zero_division=0)
    assert sorted(s.per_class) == ["a", "b", "c"]
    for i, c in enumerate(["a", "b", "c"]):
        assert s.per_class[c]["recall"] == pytest.approx(r[i]) and s.per_class[c]["f1"] == pytest.approx(f[i])
        assert s.per_class[c]["support"] == n[i]
        assert s.per_class[c]["precision"] == (None if not (predicted == c).any() else pytest.approx(p[i]))


def test_recall_per_class_and_the_imbalance_line():
    from cellmorph.evaluation.metrics import balance_line, class_balance

    truth = ["a"] * 60 + ["b"] * 30 + ["c"] * 10
    predicted = ["a"] * 60 + ["b"] * 15 + ["a"] * 15 + ["c"] * 3 + ["a"] * 7
    pred = pd.DataFrame({"Metadata_Label": truth, **{f"prob_{k}": [1.0 if p == k else 0.0 for p in predicted] for k in "abc"}})
    m = compute_metrics(pred, "Metadata_Label", "random")
    line = m.recall_line("image")
    # lowest recall first, with the counts behind each
    assert line == "recall per class (images), lowest first: c 30.0% (3/10), b 50.0% (15/30), a 100.0% (60/60)"
    assert m.recall_line("treatment") == ""  # a level not scored: nothing to say
    b = class_balance(truth, True, 'frozen.class_weight = "none"')
    assert (b["ratio"], b["largest"], b["smallest"], b["images"]) == (6.0, "a", "c", {"a": 60, "b": 30, "c": 10})
    on = balance_line(b)
    assert on.startswith("classes differ 6.0x in images (a 60, c 10): class weights on") and 'frozen.class_weight = "none" turns them off' in on
    off = balance_line(class_balance(truth, False, "finetune.class_weights = false"))
    assert "class weights are OFF (finetune.class_weights = false)" in off
    assert balance_line(class_balance(["a"] * 20 + ["b"] * 10, True, "x")) == ""  # 2x exactly: not worth a line


def _multi_seed() -> Metrics:
    seeds = [compute_metrics(nuclei(a).assign(seed=s), "Metadata_Label", "random") for s, a in enumerate([[0.9, 0.2, 0.6, 0.3], [0.9, 0.2, 0.1, 0.3], [0.9, 0.8, 0.1, 0.3]])]
    for s, m in enumerate(seeds):
        m.curve = [{"epoch": 1, "image": 0.5}, {"epoch": 2, "image": m.level("image").accuracy}]
        m.context = {"experiment": "nuclei", "model": "m", "init": "xavier" if s else "imagenet"}
    return combine_seeds(seeds)


def test_combine_seeds_mean_and_sem():
    m = _multi_seed()  # image accuracies 2/4, 3/4, 4/4
    assert m.seeds == [0, 1, 2] and len(m.per_seed) == 3
    img = m.level("image")
    assert (img.correct, img.total) == (9, 12) and img.accuracy == pytest.approx(0.75)
    sp = m.spread["image"]
    assert sp["accuracy_mean"] == pytest.approx(0.75) and sp["n_seeds"] == 3
    assert sp["accuracy_sem"] == pytest.approx(np.std([0.5, 0.75, 1.0], ddof=1) / np.sqrt(3))
    assert sp["macro_f1_mean"] == pytest.approx(np.mean([s.level("image").macro_f1 for s in m.per_seed]))
    assert [(p["seed"], p["epoch"]) for p in m.curve] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert "± 14.4%" in m.summary_line() and "mean ± SEM over 3 seeds" in m.summary_line()
    one = combine_seeds(m.per_seed[:1])
    assert one.spread["image"]["accuracy_sem"] is None and one.spread["image"]["n_seeds"] == 1 and one.per_seed == []
    assert combine_seeds([m]).spread == m.spread  # a multi-seed input is unpacked, not nested
    # a "seed" column gives the same as scoring each seed apart and combining
    table = pd.concat([nuclei(a).assign(seed=s) for s, a in enumerate([[0.9, 0.2, 0.6, 0.3], [0.9, 0.2, 0.1, 0.3], [0.9, 0.8, 0.1, 0.3]])])
    assert compute_metrics(table, "Metadata_Label", "random").spread == m.spread
    other = compute_metrics(nuclei([0.9, 0.2, 0.6, 0.3]), "Metadata_Label", "loco")
    with pytest.raises(CellmorphError, match="protocol loco vs random"):
        combine_seeds([m.per_seed[0], other])


def test_json_round_trip_exact(tmp_path):
    m = compute_metrics(screen(unlabelled=None), "Metadata_MoA", "lcbo", "leave compound and batch out")
    m.context = {"experiment": "x", "n_folds": 3, "seconds": float("nan")}
    m.excluded = [{"compound": "simvastatin", "reason": "no training image of its class"}]
    m.seeds = [0]
    assert m.to_dict()["context"]["seconds"] is None  # JSON has no NaN
    for metrics in (m, _multi_seed()):
        metrics.write(tmp_path / "metrics.json")
        text = (tmp_path / "metrics.json").read_text()
        assert "NaN" not in text
        back = Metrics.read(tmp_path / "metrics.json")
        assert back.to_dict() == json.loads(text) == metrics.to_dict()
        assert back == Metrics.from_dict(metrics.to_dict())
    assert Metrics.read(tmp_path / "metrics.json").per_seed[1].level("image").correct == 3
    m.context["seconds"] = 1.5
    assert Metrics.from_dict(m.to_dict()) == m


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "run" / "metrics.json"
    with pytest.raises(CellmorphError, match=f"{re.escape(str(missing))}: not found"):
        Metrics.read(missing)
    bad = tmp_path / "bad.json"
    bad.write_text('{"protocol": "loco", ')
    with pytest.raises(CellmorphError, match=f"{re.escape(str(bad))}: not valid JSON.*[Rr]erun the run"):
        Metrics.read(bad)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"protocol": "loco", "treatment_accuracy_loco": 1.0, "images_correct": 573}))
    with pytest.raises(CellmorphError, match=f"{re.escape(str(old))}: not a metrics file.*older.*[Rr]erun the run"):
        Metrics.read(old)
    broken = tmp_path / "broken.json"
    d = compute_metrics(nuclei([0.9, 0.2, 0.1, 0.3]), "Metadata_Label", "random").to_dict()
    del d["levels"]["image"]["correct"]
    broken.write_text(json.dumps(d))
    with pytest.raises(CellmorphError, match=f"{re.escape(str(broken))}: metrics file is incomplete"):
        Metrics.read(broken)


def _screen_run(seed: int, shift: float) -> Metrics:
    pred = screen()
    if shift:  # seed 1 gets c1@2 right: wells of P1/B03 and P2/B03 move to A
        pred.loc[pred.Metadata_Concentration == 2.0, "prob_A"] += shift
    m = compute_metrics(pred.assign(seed=seed), "Metadata_MoA", "loco")
    m.context = {"experiment": "screen", "model": "resnet50", "init": "imagenet"}
    m.curve = [{"seed": seed, "epoch": e, "image": 0.5 + 0.1 * e, "treatment": 0.5 + 0.2 * e} for e in (1, 2)]
    return m


def test_summarize_runs_with_and_without_treatments(tmp_path):
    from cellmorph.reporting.summary import summarize_runs

    runs = []
    for i, m in enumerate([_screen_run(0, 0.0), _screen_run(1, 0.9), _multi_seed().per_seed[0], combine_seeds(_multi_seed().per_seed[1:])]):
        m.context = m.context | {"init": "imagenet"}  # one nuclei group: seed 0 alone, seeds 1 and 2 in one folder
        (tmp_path / f"run{i}").mkdir()
        m.write(tmp_path / f"run{i}" / "metrics.json")
        runs.append(tmp_path / f"run{i}")
    t = summarize_runs(runs, tmp_path / "sum")
    csv = pd.read_csv(tmp_path / "sum" / "summary.csv")
    assert list(zip(csv.experiment, csv.level)) == [("screen", "treatment"), ("screen", "well"), ("screen", "image"), ("nuclei", "image")]
    assert len(t) == 4
    nuc = csv.iloc[3]
    assert nuc.seeds == "0,1,2" and nuc.n_seeds == 3 and nuc.correct == "2/4 3/4 4/4"
    assert nuc.accuracy_mean == pytest.approx(0.75) and nuc.accuracy_sem == pytest.approx(0.1443, abs=1e-4)
    treat = csv[(csv.experiment == "screen") & (csv.level == "treatment")].iloc[0]
    assert treat.correct == "3/4 4/4" and treat.accuracy_mean == pytest.approx(0.875) and treat.accuracy_sem == pytest.approx(0.125)
    assert (tmp_path / "sum" / "curves.png").stat().st_size > 10_000
    md = (tmp_path / "sum" / "summary.md").read_text()
    assert "87.5% ± 12.5%" in md and "balanced accuracy" in md
    with pytest.raises(CellmorphError, match="metrics.json: not found"):
        summarize_runs([tmp_path / "nothing"], tmp_path / "sum2")


def test_report_and_confusion_for_screens_and_nuclei(tmp_path):
    from cellmorph.config import load_config
    from cellmorph.reporting.report import write_confusion_png, write_report

    cfg = load_config(REPO / "configs" / "quickstart.toml")
    pred = screen(unlabelled="")
    m = compute_metrics(pred, "Metadata_MoA", "loco", "leave one compound out")
    m.excluded = [{"compound": "simvastatin", "reason": "its class has no training image"}]
    write_report(tmp_path / "screen.html", m, cfg)
    write_confusion_png(tmp_path / "screen.png", pred, m, "Metadata_MoA", "screen")
    page = (tmp_path / "screen.html").read_text()
    assert "balanced accuracy" in page and "macro-F1" in page and "Per class (treatments)" in page
    assert "compound c1 concentration 2.0: true A, predicted B" in page and "simvastatin" in page
    assert "3/4" in page and "10/16" in page and "5/8" in page
    assert (tmp_path / "screen.png").stat().st_size > 20_000

    multi = _multi_seed()
    write_report(tmp_path / "nuclei.html", multi, cfg)
    write_confusion_png(tmp_path / "nuclei.png", pd.concat([nuclei([0.9, 0.2, 0.6, 0.3]).assign(seed=s) for s in range(3)]), multi, "Metadata_Label", "nuclei")
    page = (tmp_path / "nuclei.html").read_text()
    assert "Per class (images)" in page and "75.0% ± 14.4%" in page and "<td>treatments</td>" not in page
    assert (tmp_path / "nuclei.png").stat().st_size > 10_000
