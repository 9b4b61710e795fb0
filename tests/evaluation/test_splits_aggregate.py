import numpy as np
import pandas as pd
import pytest

from cellmorph.evaluation.aggregate import aggregate
from cellmorph.evaluation.metrics import compute_metrics, confusion
from cellmorph.evaluation.splits import Fold, LeakageError, assert_no_leak


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
    wells = aggregate(pred, "well", "Metadata_MoA")
    assert sorted(wells["prob_A"].round(6)) == [0.3, 0.8]
    t = aggregate(pred, "treatment", "Metadata_MoA")
    assert len(t) == 1 and t["prob_A"].iloc[0] == pytest.approx(0.55) and t["predicted"].iloc[0] == "A"
    assert t["n"].iloc[0] == 2  # wells
    m = compute_metrics(pred, "Metadata_MoA", "loco")
    assert m.level("treatment").correct == 1 and (m.level("image").correct, m.level("image").total) == (2, 6)
    assert (m.level("well").correct, m.level("well").total) == (1, 2)


def test_concentrations_are_separate_treatments():
    rows = [["P1", "B02", "c", 1.0, "A", 0.9, 0.1], ["P1", "B03", "c", 2.0, "A", 0.2, 0.8]]
    t = aggregate(_pred(rows), "treatment", "Metadata_MoA")
    assert list(t["predicted"]) == ["A", "B"]
    m = compute_metrics(_pred(rows), "Metadata_MoA", "loco")
    assert m.level("treatment").total == 2 and m.level("treatment").misclassified[0]["concentration"] == 2.0


def test_loco_holds_out_each_compound_once():
    df = pd.DataFrame({"Metadata_Compound": list("aabbbc"), "Metadata_MoA": list("xxyyyx")})
    from cellmorph.config import EvaluationConfig
    from cellmorph.evaluation.protocols import make_folds

    folds, excluded, _ = make_folds(df, "Metadata_MoA", EvaluationConfig(protocol="loco"))
    assert [f.name for f in folds] == ["a", "c"] and [e["group"] for e in excluded] == ["b"]  # b alone in class y: not scorable
    assert sorted(np.concatenate([f.test for f in folds])) == [0, 1, 5]
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
    folds = _folds(subset_table.df, "loco")
    assert len(folds) == 18
    assert sum(len(f.test) for f in folds) == 660
    # Every MoA keeps at least one training compound in every fold (else LOCO could not score it).
    for f in folds:
        held = set(subset_table.df.Metadata_MoA.iloc[f.test])
        assert held <= set(subset_table.df.Metadata_MoA.iloc[f.train])


def test_lcbo_on_real_subset(subset_table):
    from cellmorph.config import EvaluationConfig
    from cellmorph.evaluation.protocols import make_folds

    df = subset_table.df
    folds, excluded, _ = make_folds(df, "Metadata_MoA", EvaluationConfig(protocol="lcbo"))
    # Both cholesterol-lowering compounds come from Week9 only: holding out that week leaves that MoA
    # no training image, so those two compounds cannot be scored.
    assert sorted(e["group"] for e in excluded) == ["mevinolin/lovastatin", "simvastatin"]
    assert all(e["classes"] == ["Cholesterol-lowering"] and e["batch"] == ["Week9"] for e in excluded)
    assert len(folds) == 16
    for f in folds:
        test_batches = set(df.Metadata_Batch.iloc[f.test])
        assert test_batches.isdisjoint(df.Metadata_Batch.iloc[f.train])
        assert f.name not in set(df.Metadata_Compound.iloc[f.train])
        assert set(df.Metadata_MoA.iloc[f.test]) <= set(df.Metadata_MoA.iloc[f.train])
    # LCBO never trains on more images than LOCO, and on fewer wherever the week holds other compounds
    loco = {f.name: f for f in _folds(df, "loco")}
    for f in folds:
        week_mates = set(df.Metadata_Compound[df.Metadata_Batch.isin(df.Metadata_Batch.iloc[f.test])]) - {f.name}
        assert (len(f.train) < len(loco[f.name].train)) == bool(week_mates)
        assert len(f.train) <= len(loco[f.name].train)


def test_paper_random_split_real(crchisto_table):
    (fold,) = _folds(crchisto_table.df, "random", "Metadata_Label")
    assert (len(fold.train), len(fold.test)) == (17004, 3401)  # Bayramoglu & Heikkilae's sizes
    assert len(np.union1d(fold.train, fold.test)) == 20405 and not len(np.intersect1d(fold.train, fold.test))
    (again,) = _folds(crchisto_table.df, "random", "Metadata_Label")
    assert np.array_equal(again.test, fold.test)  # seeded: the same split every run
    # nuclei of one image land on both sides: the leak the grouped split removes
    df = crchisto_table.df
    assert len(set(df.Metadata_Image.iloc[fold.train]) & set(df.Metadata_Image.iloc[fold.test])) > 50


def test_image_grouped_split_real(crchisto_table):
    df = crchisto_table.df
    (fold,) = _folds(df, "image-grouped", "Metadata_Label")
    assert set(df.Metadata_Image.iloc[fold.train]).isdisjoint(df.Metadata_Image.iloc[fold.test])
    assert len(fold.train) + len(fold.test) == 20405
    assert abs(len(fold.test) - 3401) < 150  # about the paper's test fraction, in whole images
    assert set(df.Metadata_Label.iloc[fold.test]) == {"epithelial", "fibroblast", "inflammatory"}


def test_holdout_25_real(subset_table):
    (fold,) = _folds(subset_table.df, "holdout-25")
    assert (len(fold.train), len(fold.test)) == (495, 165)


def test_group_split_checks():
    from cellmorph.evaluation.splits import group_split, random_split

    df = pd.DataFrame({"g": list("aaabbbcccddd")})
    (f,) = group_split(df, "g", test_fraction=0.25, seed=1)
    assert len(f.test) == 3 and df.g.iloc[f.test].nunique() == 1
    with pytest.raises(ValueError):
        group_split(pd.DataFrame({"g": list("aaa")}), "g", 0.5)
    with pytest.raises(ValueError):
        random_split(df, test_fraction=0.0)


def test_metrics_without_compounds():
    # nuclei: no compounds, no wells: the image level (one row = one patch) only
    pred = pd.DataFrame({"Metadata_Label": list("AABB"), "prob_A": [0.9, 0.2, 0.1, 0.3], "prob_B": [0.1, 0.8, 0.9, 0.7]})
    m = compute_metrics(pred, "Metadata_Label", "random")
    assert list(m.levels) == ["image"] and m.level("image").accuracy == 0.75 and m.level("image").total == 4
    assert {c: v["recall"] for c, v in m.level("image").per_class.items()} == {"A": 0.5, "B": 1.0}


def _folds(df, protocol, label="Metadata_MoA", **ev):
    from cellmorph.config import EvaluationConfig
    from cellmorph.evaluation.protocols import make_folds

    return make_folds(df, label, EvaluationConfig(protocol=protocol, **ev))[0]


def test_single_compound_class_is_excluded_and_listed(subset_table):
    """LOCO: a class with one compound has no training data when that compound is held out: excluded, listed."""
    from cellmorph.config import EvaluationConfig
    from cellmorph.evaluation.protocols import make_folds

    df = subset_table.df[~subset_table.df.Metadata_Compound.isin(["AZ138"])]  # Eg5 inhibitors keep only AZ-C
    folds, excluded, text = make_folds(df, "Metadata_MoA", EvaluationConfig(protocol="loco"))
    assert [e["group"] for e in excluded] == ["AZ-C"] and excluded[0]["classes"] == ["Eg5 inhibitors"]
    assert "AZ-C" not in {f.name for f in folds} and "1 held-out group(s) excluded" in text


def test_logo_and_group_kfold_by_any_column(subset_table):
    df = subset_table.df.assign(Metadata_Patient=subset_table.df.Metadata_Plate)
    logo = _folds(df, "logo", group="Metadata_Patient")
    assert {f.name for f in logo} <= set(df.Metadata_Patient)
    for f in _folds(df, "group-kfold", group="Metadata_Patient", n_splits=4):
        assert set(df.Metadata_Patient.iloc[f.train]).isdisjoint(df.Metadata_Patient.iloc[f.test])


def test_validation_split_never_touches_the_test_rows(crchisto_table):
    """evaluation.validation = true scores a split of the training rows; the test rows are in neither part,
    and the grouped protocol keeps whole images apart in the validation split too."""
    from cellmorph.config import EvaluationConfig
    from cellmorph.errors import CellmorphError
    from cellmorph.evaluation.protocols import make_folds

    df = crchisto_table.df
    for protocol in ("random", "image-grouped"):
        (test_fold,), _, _ = make_folds(df, "Metadata_Label", EvaluationConfig(protocol=protocol))
        (val,), _, text = make_folds(df, "Metadata_Label", EvaluationConfig(protocol=protocol, validation=True))
        assert np.isin(val.train, test_fold.train).all() and np.isin(val.test, test_fold.train).all()
        assert len(val.train) + len(val.test) == len(test_fold.train) and not len(np.intersect1d(val.train, val.test))
        assert "validation" in text and val.name.endswith("validation")
        if protocol == "image-grouped":
            assert set(df.Metadata_Image.iloc[val.train]).isdisjoint(df.Metadata_Image.iloc[val.test])
    with pytest.raises(CellmorphError, match="single-split"):
        make_folds(df, "Metadata_Label", EvaluationConfig(protocol="logo", group="Metadata_Image", validation=True))


@pytest.mark.parametrize("how", ["median", "mean"])
def test_one_aggregation_same_units_for_probabilities_and_features(how):
    """aggregate (prob_ columns), novelty.unit_profiles (image features) and the profiling well/treatment
    tables (Image_CNN_ columns) are one aggregation: the same wells and treatments, counts and values."""
    from cellmorph.evaluation.aggregate import aggregate_units, unit_keys
    from cellmorph.evaluation.novelty import unit_profiles
    from cellmorph.profiling.tables import well_and_treatment_profiles

    rng = np.random.default_rng(0)
    rows = []
    for plate in ("P2", "P1"):  # unsorted on purpose
        for well, (compound, conc, moa) in {"B03": ("c2", 0.5, "B"), "B02": ("c1", 1.0, "A"), "C02": ("c1", 3.0, "A"), "D04": ("c3", 1.0, "B")}.items():
            for _ in range(int(rng.integers(1, 5))):  # 1 to 4 images per well, odd and even counts
                a = float(rng.random())
                rows.append([plate, well, compound, conc, moa, a, 1 - a])
    pred = _pred(rows).sample(frac=1.0, random_state=1).reset_index(drop=True)
    feats = pred[["prob_A", "prob_B"]].to_numpy(dtype=np.float64)
    emb = pred.drop(columns=["prob_A", "prob_B"]).assign(Image_CNN_m_0000=feats[:, 0], Image_CNN_m_0001=feats[:, 1])

    assert unit_keys(pred, "well") == ["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration"]
    assert unit_keys(pred, "treatment") == ["Metadata_Compound", "Metadata_Concentration"]
    profiles = dict(zip(("well", "treatment"), well_and_treatment_profiles(emb)))  # medians, the paper's aggregation
    for level, n_units, count in (("well", 8, "Metadata_Images"), ("treatment", 4, "Metadata_Wells")):
        keys = unit_keys(pred, level)
        probs = aggregate(pred, level, "Metadata_MoA", how)
        prof = unit_profiles(feats, pred, level, "Metadata_MoA", how)
        units, unit_of_row = aggregate_units(pred, level, ["prob_A", "prob_B"], how, carry=["Metadata_MoA"])
        assert len(probs) == n_units
        pd.testing.assert_frame_equal(prof.keys, probs[keys + ["Metadata_MoA"]], check_exact=True)
        assert np.array_equal(prof.profiles, probs[["prob_A", "prob_B"]].to_numpy())
        assert np.array_equal(prof.unit_of_row, unit_of_row) and np.array_equal(units["n"], probs["n"])
        # each image's unit holds that image's keys
        pd.testing.assert_frame_equal(probs.loc[unit_of_row, keys].reset_index(drop=True), pred[keys], check_exact=True)
        if how == "median":
            p = profiles[level]
            pd.testing.assert_frame_equal(p[keys].reset_index(drop=True), probs[keys], check_exact=True)
            assert np.array_equal(p[["Image_CNN_m_0000", "Image_CNN_m_0001"]].to_numpy(), prof.profiles)
            assert np.array_equal(p[count], probs["n"])
    with pytest.raises(Exception, match="wells or treatments"):
        aggregate_units(pred, "plate", ["prob_A"])
