import numpy as np
import pandas as pd
import pytest

from cellmorph.aggregate import to_treatments, to_wells
from cellmorph.metrics import compute_metrics, confusion
from cellmorph.splits import Fold, LeakageError, assert_no_leak, leave_one_compound_out


def _pred(rows):
    return pd.DataFrame(rows, columns=["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "prob_A", "prob_B"])


def test_median_image_to_well_to_treatment():
    # Treatment t1 (true A) on two wells. Well 1 images: A-probs 0.9, 0.8, 0.1 -> median 0.8.
    # Well 2: 0.2, 0.3, 0.4 -> 0.3. Treatment median over wells = (0.8 + 0.3) / 2 = 0.55 > B's 0.45.
    # A mean over all 6 images would give 0.45 for A: the median path is what makes it right.
    rows = []
    for a in (0.9, 0.8, 0.1):
        rows.append(["P1", "B02", "t1", 1.0, "A", a, 1 - a])
    for a in (0.2, 0.3, 0.4):
        rows.append(["P2", "B02", "t1", 1.0, "A", a, 1 - a])
    pred = _pred(rows)
    wells = to_wells(pred)
    assert sorted(wells["prob_A"].round(6)) == [0.3, 0.8]
    t = to_treatments(pred)
    assert len(t) == 1 and t["prob_A"].iloc[0] == pytest.approx(0.55) and t["predicted"].iloc[0] == "A"
    assert t["n_wells"].iloc[0] == 2
    m = compute_metrics(pred, "loco")
    assert m["treatments_correct"] == 1 and m["images_correct"] == 2 and m["images_total"] == 6


def test_concentrations_are_separate_treatments():
    rows = [["P1", "B02", "c", 1.0, "A", 0.9, 0.1], ["P1", "B03", "c", 2.0, "A", 0.2, 0.8]]
    t = to_treatments(_pred(rows))
    assert list(t["predicted"]) == ["A", "B"]
    m = compute_metrics(_pred(rows), "loco")
    assert m["treatments_total"] == 2 and m["misclassified_treatments"][0]["concentration"] == 2.0


def test_loco_holds_out_each_compound_once():
    df = pd.DataFrame({"Metadata_Compound": list("aabbbc"), "Metadata_MoA": list("xxyyyx")})
    folds = leave_one_compound_out(df)
    assert [f.name for f in folds] == ["a", "b", "c"]
    assert sorted(np.concatenate([f.test for f in folds])) == list(range(6))
    for f in folds:
        assert set(df.Metadata_Compound.iloc[f.train]).isdisjoint(df.Metadata_Compound.iloc[f.test])


def test_leak_is_caught():
    df = pd.DataFrame({"Metadata_Compound": list("aab")})
    with pytest.raises(LeakageError):
        assert_no_leak(df, Fold("bad", train=np.array([0, 2]), test=np.array([1])), "Metadata_Compound")


def test_confusion_counts():
    m = confusion(["A", "A", "B"], ["A", "B", "B"], ["A", "B"])
    assert m.tolist() == [[1, 1], [0, 1]]


def test_loco_on_real_subset(subset_table):
    folds = leave_one_compound_out(subset_table.df)
    assert len(folds) == 18
    assert sum(len(f.test) for f in folds) == 660
    # Every MoA keeps at least one training compound in every fold (else LOCO could not score it).
    for f in folds:
        held = set(subset_table.df.Metadata_MoA.iloc[f.test])
        assert held <= set(subset_table.df.Metadata_MoA.iloc[f.train])


def test_lcbo_on_real_subset(subset_table):
    from cellmorph.splits import leave_compound_and_batch_out, lcbo_excluded

    df = subset_table.df
    folds = leave_compound_and_batch_out(df)
    excluded = lcbo_excluded(df)
    # Both cholesterol-lowering compounds come from Week9 only: holding out that week leaves that MoA
    # no training image, so those two compounds cannot be scored.
    assert sorted(e["compound"] for e in excluded) == ["mevinolin/lovastatin", "simvastatin"]
    assert all(e["Metadata_MoA"] == ["Cholesterol-lowering"] for e in excluded)
    assert len(folds) == 16
    for f in folds:
        test_batches = set(df.Metadata_Batch.iloc[f.test])
        assert test_batches.isdisjoint(df.Metadata_Batch.iloc[f.train])
        assert f.name not in set(df.Metadata_Compound.iloc[f.train])
        assert set(df.Metadata_MoA.iloc[f.test]) <= set(df.Metadata_MoA.iloc[f.train])
    # LCBO never trains on more images than LOCO, and on fewer wherever the week holds other compounds
    loco = {f.name: f for f in leave_one_compound_out(df)}
    for f in folds:
        week_mates = set(df.Metadata_Compound[df.Metadata_Batch.isin(df.Metadata_Batch.iloc[f.test])]) - {f.name}
        assert (len(f.train) < len(loco[f.name].train)) == bool(week_mates)
        assert len(f.train) <= len(loco[f.name].train)
