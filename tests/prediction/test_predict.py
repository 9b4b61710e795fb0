"""`cellmorph run` writes the final model (RUN/model), `cellmorph predict` scores new images with it:
consistency with the cross-validation on real data, the three input formats, conformal columns, bad
input (one line, exit 2, nothing written), MC dropout at a tiny size, the report in a headless browser."""

from __future__ import annotations

from pathlib import Path

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cellmorph as cm
from cellmorph.cli import main
from cellmorph.data.table import ImageTable

REPO = Path(__file__).resolve().parents[2]

CLASSES = ["Aurora kinase inhibitors", "Cholesterol-lowering", "DNA damage", "DNA replication", "Eg5 inhibitors", "Protein synthesis"]
PROBS = [f"prob_{c}" for c in CLASSES]


def _loaddata(rows: pd.DataFrame, path) -> None:
    """A CellProfiler LoadData CSV of subset rows (Image_FileName_/Image_PathName_ + Metadata_*)."""
    paths = rows["Image_Path_RGB"].map(lambda p: os.path.split(p))
    df = rows[["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration"]].copy()
    df["Image_FileName_RGB"] = [f for _, f in paths]
    df["Image_PathName_RGB"] = [d for d, _ in paths]
    df.to_csv(path, index=False)


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["cellmorph", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    captured = capsys.readouterr()
    return e.value.code, " ".join((captured.out + captured.err).split())


@pytest.mark.slow
def test_run_writes_final_model_with_calibration(quick_run, subset_table):
    model = quick_run / "model"
    assert sorted(p.name for p in model.iterdir()) == ["bundle.json", "calibration.parquet", "config.toml", "image_reference.npz", "model.safetensors",
                                                         "reference_profiles.npz"]
    ref = dict(np.load(model / "reference_profiles.npz"))  # the distance novelty score's reference: every labelled training unit
    n_treat = subset_table.df.groupby(["Metadata_Compound", "Metadata_Concentration"]).ngroups
    n_well = subset_table.df.groupby(["Metadata_Plate", "Metadata_Well"]).ngroups
    assert ref["treatment_profiles"].shape == (n_treat, 1280) and ref["well_profiles"].shape == (n_well, 1280)
    assert sorted(set(ref["treatment_groups"])) == sorted(ref["group_names"]) == sorted(subset_table.df["Metadata_Compound"].unique())
    assert ref["group_n"].sum() == len(subset_table) and "image_profiles" not in ref
    meta = json.loads((model / "bundle.json").read_text())
    assert meta["trained_on"]["images"] == len(subset_table) and meta["classes"] == CLASSES
    assert meta["calibration"]["protocol"] == "loco" and meta["calibration"]["folds"] == 1
    cal = pd.read_parquet(model / "calibration.parquet")
    oof = pd.read_parquet(quick_run / "predictions.parquet")
    assert len(cal) == len(oof) and np.array_equal(cal[PROBS].to_numpy(), oof[PROBS].to_numpy())  # the out-of-fold scores, as scored
    assert cal["Metadata_Compound"].nunique() == 1
    clf = cm.Classifier.load(model)
    assert clf.calibration is not None and len(clf.calibration) == len(cal)


@pytest.mark.slow
def test_final_model_from_the_feature_cache_is_the_classifier_bundle(quick_run, subset_table, tmp_path):
    """The run saved its frozen final model from the cached features and backbone weights (no torch, no
    timm): the same weights, head and bundle.json fields as Classifier.fit(...).save(...) of that config."""
    from safetensors.numpy import load_file

    from cellmorph.config import load_config

    model = quick_run / "model"
    assert (quick_run / "environment.json").is_file() and "model" in {p.name for p in quick_run.iterdir()}
    clf = cm.Classifier(config=load_config(model / "config.toml")).fit(subset_table)
    ref = clf.save(tmp_path / "ref")
    got, want = load_file(str(model / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert sorted(got) == sorted(want) and any(k.startswith("head.") for k in got)
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    meta, ref_meta = (json.loads((d / "bundle.json").read_text()) for d in (model, ref))
    for field in ("mode", "model", "init", "classes", "label", "input", "preprocessing", "trained_on", "format_version"):
        assert meta[field] == ref_meta[field], field
    assert (model / "config.toml").read_text() == (ref / "config.toml").read_text()


@pytest.mark.slow
def test_warm_frozen_run_saves_its_model_without_torch(quick_run, data_dir, tmp_path):
    """With the features (and the backbone beside them) cached, a frozen run, final model included, imports
    neither torch nor timm: what keeps the warm quickstart fast."""
    code = (
        "import sys; from cellmorph.config import load_config, override; from cellmorph.engine.runner import run_experiment; "
        f"run_experiment(override(load_config({str(REPO / 'configs' / 'quickstart.toml')!r}), {{'evaluation.max_folds': 1}}), {str(tmp_path / 'warm')!r}); "
        "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "CELLMORPH_DATA": str(data_dir)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "warm" / "model" / "model.safetensors").read_bytes() == (quick_run / "model" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_predict_reproduces_the_loco_fold(quick_run, subset_table, tmp_path, monkeypatch, capsys):
    """A bundle trained without the fold's compound (same recipe, the runner's fold seed), run through
    `cellmorph predict` on that compound's images from a LoadData CSV, gives the fold's probabilities."""
    fold = json.loads((quick_run / "folds" / "00" / "fold.json").read_text())
    compound = fold["held_out"]
    df = subset_table.df.copy()
    held = df["Metadata_Compound"] == compound
    df.loc[held, "Metadata_MoA"] = ""  # never trained on: rows without a label are skipped by fit
    without = ImageTable(df, name=subset_table.name, label=subset_table.label, source=subset_table.source)
    cfg = cm.load_config(quick_run / "config.toml")
    clf = cm.Classifier(config=cm.ExperimentConfig.model_validate({**cfg.model_dump(), "seed": cfg.seed * 1000 + 0})).fit(without)
    assert clf._trained_on["images"] == int((~held).sum())
    bundle = clf.save(tmp_path / "without")
    _loaddata(subset_table.df[held], tmp_path / "load_data.csv")
    res = cm.predict_images(bundle, tmp_path / "load_data.csv", tmp_path / "pred")
    fold_pred = pd.read_parquet(quick_run / "folds" / "00" / "predictions.parquet")
    key = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    want = fold_pred.assign(Metadata_Site=fold_pred.groupby(key[:2]).cumcount())
    got = res.images.assign(Metadata_Site=res.images.groupby(key[:2]).cumcount())
    merged = want.merge(got, on=key, suffixes=("_fold", "_predict"))
    assert len(merged) == int(held.sum()) == len(fold_pred)
    a = merged[[f"{c}_fold" for c in PROBS]].to_numpy()
    b = merged[[f"{c}_predict" for c in PROBS]].to_numpy()
    print(f"max |predict - LOCO fold| = {np.abs(a - b).max():.2e} over {a.size} probabilities")
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5)
    # Saved outside a run: no calibration, said so, no p-value columns.
    info = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert "no out-of-fold" in info["calibration"]["treatment"]["none"]
    assert not [c for c in res.treatments.columns if c.startswith("pvalue_")]
    # No reference profiles either: softmax (here: no flag at all), said so; asking for the distance score is a one-line error.
    assert info["novelty_score"] == "softmax" and "no well/treatment reference profiles" in info["novelty"]["treatment"]["distance"]
    assert "distance" not in res.treatments.columns
    monkeypatch.setattr(sys, "argv", ["cellmorph", "predict", str(bundle), str(tmp_path / "load_data.csv"), "--out", str(tmp_path / "o"), "--novelty", "distance"])
    with pytest.raises(SystemExit) as e:
        main()
    text = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and text.count("error:") == 1 and "holds no distance reference" in text and "save_model = true" in text, text
    # With the reference profiles of its training rows (the run's cached features), the unseen compound's distance
    # p-values are novelty.py's: nearest training unit, calibrated on leave-one-compound-out distances.
    from cellmorph.models.features import cached_features
    from cellmorph.evaluation.novelty import distance_p_values, nearest_distance, reference_profiles, unit_profiles
    from cellmorph.data.store import build_store

    feats = cached_features(build_store(subset_table, cfg.dataset.image_size), cfg.model, cfg.frozen.tta)
    train = np.flatnonzero(~held.to_numpy())
    clf.reference = reference_profiles(feats[train], subset_table.df.iloc[train], "Metadata_MoA")
    res = cm.predict_images(clf.save(tmp_path / "with-reference"), tmp_path / "load_data.csv", tmp_path / "pred-distance")
    info = json.loads((tmp_path / "pred-distance" / "predict.json").read_text())
    assert info["novelty_score"] == "distance"  # the default without calibration data
    compounds = subset_table.df["Metadata_Compound"].to_numpy()
    for level in ("treatment", "well"):
        prof = unit_profiles(feats, subset_table.df, level, "Metadata_MoA")
        units, dist = nearest_distance(feats, prof, train, np.flatnonzero(held.to_numpy()))
        cal = np.concatenate([nearest_distance(feats, prof, train[compounds[train] != c], np.flatnonzero(compounds == c))[1]
                              for c in sorted(set(compounds[train]))])
        want = prof.keys.iloc[units].assign(d=dist, p=distance_p_values(dist, cal)).drop(columns="Metadata_MoA")
        got = res.level(level).merge(want, on=[c for c in want.columns if c.startswith("Metadata_")], validate="one_to_one")
        assert len(got) == len(units) == len(res.level(level)) and info["novelty"][level]["calibration_distances"] == len(cal)
        print(f"{level}s of {compound}: distance {got['distance'].round(3).tolist()}, p {got['distance_pvalue'].round(3).tolist()}")
        np.testing.assert_allclose(got["distance"], got["d"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got["distance_pvalue"], got["p"], rtol=0, atol=1e-12)
        assert (got["none_of_known"] == (got["p"] <= 0.1)).all() and (got["flagged_by"] == np.where(got["p"] <= 0.1, "distance", "")).all()


@pytest.mark.slow
def test_three_input_formats_agree_and_outputs_have_the_documented_columns(quick_run, subset_table, tmp_path, monkeypatch, capsys):
    rows = subset_table.df.iloc[:8]  # two wells (4 fields each), of two treatments
    folder_csv = tmp_path / "folder.csv"
    rows[["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Image_Path_RGB"]].to_csv(folder_csv, index=False)
    _loaddata(rows, tmp_path / "loaddata.csv")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i, p in enumerate(rows["Image_Path_RGB"]):
        shutil.copy(p, pictures / f"field_{i}.png")
    results = {}
    for name, src in (("folder", folder_csv), ("loaddata", tmp_path / "loaddata.csv"), ("dir", pictures)):
        code, text = _cli(monkeypatch, capsys, "predict", quick_run / "model", src, "--out", tmp_path / f"out-{name}", "--level", "0.9")
        assert code in (0, None), text
        results[name] = pd.read_parquet(tmp_path / f"out-{name}" / "predictions.parquet")
    for name in ("loaddata", "dir"):
        np.testing.assert_allclose(results[name][PROBS].to_numpy(), results["folder"][PROBS].to_numpy(), rtol=0, atol=1e-6)
    img = results["loaddata"]
    for col in [*PROBS, "predicted", "probability", *(f"pvalue_{c}" for c in CLASSES), "prediction_set", "set_size", "novelty", "none_of_known"]:
        assert col in img.columns, col
    assert (img["predicted"] == [CLASSES[i] for i in img[PROBS].to_numpy().argmax(axis=1)]).all()
    in_set = [p in s.split("; ") for p, s in zip(img["predicted"], img["prediction_set"])]
    p_top = img[[f"pvalue_{c}" for c in CLASSES]].to_numpy().max(axis=1)
    assert all(i == (p > 0.1) for i, p in zip(in_set, p_top))  # the top class is in the set exactly when its p-value > 1 - 0.9
    assert (img["none_of_known"] == ((img["set_size"] == 0) | (img["distance_pvalue"] <= 0.1))).all()  # images: combined with the image distance
    info = json.loads((tmp_path / "out-loaddata" / "predict.json").read_text())
    assert info["novelty_score"] == "combined" and info["novelty"]["treatment"]["score"] == "combined"
    # the calibrated probability: the top class's probability tempered with the T fitted on the bundle's calibration units
    from cellmorph.evaluation.calibration import temper

    t_image = info["calibration"]["image"]["temperature"]
    assert 0.1 < t_image < 10 and info["calibration"]["treatment"]["temperature"] > 0
    np.testing.assert_allclose(img["calibrated_probability"], temper(img[PROBS].to_numpy(), t_image).max(axis=1), rtol=1e-9)
    out = tmp_path / "out-loaddata"
    assert sorted(p.name for p in out.iterdir()) == ["predict.json", "predictions.parquet", "report.html", "treatments.csv", "wells.csv"]
    wells, treatments = pd.read_csv(out / "wells.csv"), pd.read_csv(out / "treatments.csv")
    assert len(wells) == 2 and len(treatments) == 2 and (treatments["n"] == 1).all() and (wells["n"] == 4).all()
    for t in (wells, treatments):
        assert {"predicted", "probability", "calibrated_probability", "prediction_set", "set_size", "novelty", "none_of_known", "distance", "distance_pvalue", *PROBS} <= set(t.columns)
        assert (t["none_of_known"] == ((t["set_size"] == 0) | (t["distance_pvalue"] <= 0.1))).all()  # the combined flag
    assert set(results["dir"].columns) >= {"Metadata_FileName", *PROBS} and not (tmp_path / "out-dir" / "treatments.csv").exists()
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 3 * len(treatments) and "prediction set" in report  # 3 thumbnails per treatment
    # An earlier output is replaced only with --overwrite.
    code, text = _cli(monkeypatch, capsys, "predict", quick_run / "model", tmp_path / "loaddata.csv", "--out", out)
    assert code == 2 and "--overwrite" in text


def _bad(tmp_path, kind: str, subset_table):
    """(IMAGES argument, expected words) of one kind of bad input."""
    row = subset_table.df.iloc[:2]
    if kind == "corrupt":
        bad = tmp_path / "broken.png"
        bad.write_bytes(Image.open(row["Image_Path_RGB"].iloc[1]).tobytes()[:500])  # not a PNG
        pd.DataFrame({"Metadata_Well": ["A", "B"], "Image_Path_RGB": [row["Image_Path_RGB"].iloc[0], str(bad)]}).to_csv(tmp_path / "in.csv", index=False)
        return tmp_path / "in.csv", ["broken.png", "cannot decode"]
    if kind == "missing_column":
        _loaddata(row, tmp_path / "in.csv")
        pd.read_csv(tmp_path / "in.csv").drop(columns="Image_PathName_RGB").to_csv(tmp_path / "in.csv", index=False)
        return tmp_path / "in.csv", ["Image_PathName_RGB", "missing column"]
    if kind == "channels":
        grey = tmp_path / "grey.png"
        Image.fromarray(np.asarray(Image.open(row["Image_Path_RGB"].iloc[0]))[:, :, 1]).save(grey)
        pd.DataFrame({"Image_Path_DAPI": [str(grey)]}).to_csv(tmp_path / "in.csv", index=False)
        return tmp_path / "in.csv", ["grey.png", "1 channel(s)", "takes 3"]
    if kind == "empty_folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", ["no image files"]
    raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["corrupt", "missing_column", "channels", "empty_folder", "not_a_bundle"])
def test_bad_input_is_one_line_exit_2_nothing_written(kind, quick_run, subset_table, tmp_path, monkeypatch, capsys):
    model = quick_run / "model"
    if kind == "not_a_bundle":
        model = tmp_path / "notes"
        model.mkdir()
        (model / "readme.txt").write_text("mine")
        images, words = quick_run / "predictions.parquet", ["not a cellmorph model bundle", "missing model.safetensors"]
    else:
        images, words = _bad(tmp_path, kind, subset_table)
    out = tmp_path / "out"
    code, text = _cli(monkeypatch, capsys, "predict", model, images, "--out", out)
    assert code == 2, text
    assert "Traceback" not in text and text.count("error:") == 1, text
    for w in words:
        assert w in text, (w, text)
    assert not out.exists() and not list(tmp_path.glob(".out.*")), list(tmp_path.iterdir())
    if kind == "not_a_bundle":
        assert (model / "readme.txt").read_text() == "mine"


@pytest.mark.parametrize("lie", ["reordered_classes", "calibration_of_another_model", "deleted_calibration", "added_file"])
def test_a_bundle_that_lies_is_refused_naming_the_file(lie, quick_run, subset_table, tmp_path, monkeypatch, capsys):
    """bundle.json ties every file of the bundle to it (sha256), the class order is stamped in the weights, and
    the calibration's columns must be the classes in order: an edited or mixed bundle is one line, exit 2,
    never a prediction with the wrong class names."""
    bundle = tmp_path / "model"
    shutil.copytree(quick_run / "model", bundle)
    meta = json.loads((bundle / "bundle.json").read_text())
    if lie == "reordered_classes":  # the weights' outputs would be named wrongly: mevinolin as "DNA damage"
        (bundle / "bundle.json").write_text(json.dumps({**meta, "classes": meta["classes"][::-1]}))
        words = ["bundle.json", "not the class order the weights were trained with"]
    elif lie == "calibration_of_another_model":
        cal = pd.read_parquet(bundle / "calibration.parquet")
        cal.iloc[::2].to_parquet(bundle / "calibration.parquet", index=False)
        words = ["calibration.parquet", "does not match the checksum"]
    elif lie == "deleted_calibration":
        (bundle / "calibration.parquet").unlink()
        words = ["calibration.parquet", "missing", "bundle.json"]
    else:
        shutil.copyfile(quick_run / "model" / "calibration.parquet", bundle / "reference_profiles.npz")
        (bundle / "reference_profiles.npz").unlink()
        (bundle / "reference_profiles.npz").write_bytes(b"not this bundle's")
        meta["files"].pop("reference_profiles.npz", None)
        (bundle / "bundle.json").write_text(json.dumps(meta))
        words = ["reference_profiles.npz", "not part of this bundle"]
    _loaddata(subset_table.df.iloc[:2], tmp_path / "in.csv")
    out = tmp_path / "out"
    code, text = _cli(monkeypatch, capsys, "predict", bundle, tmp_path / "in.csv", "--out", out)
    assert code == 2 and "Traceback" not in text and text.count("error:") == 1, text
    for w in words:
        assert w in text, (w, text)
    assert not out.exists()


def test_another_bit_depth_than_training_is_refused(quick_run, subset_table, tmp_path, monkeypatch, capsys):
    """The same pixels as 16-bit RGB TIFFs instead of the 8-bit PNGs the model was trained on would be mapped to
    0-255 another way (a percentile stretch): refused with one line saying what was expected, nothing written."""
    import tifffile

    rows = subset_table.df.iloc[:2]
    paths = []
    for i, src in enumerate(rows["Image_Path_RGB"]):
        paths.append(tmp_path / f"field{i}.tif")
        tifffile.imwrite(paths[-1], np.asarray(Image.open(src)).astype(np.uint16) * 257, photometric="rgb")
    pd.DataFrame({"Metadata_Well": ["A", "B"], "Image_Path_RGB": [str(x) for x in paths]}).to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out"
    code, text = _cli(monkeypatch, capsys, "predict", quick_run / "model", tmp_path / "in.csv", "--out", out)
    assert code == 2 and text.count("error:") == 1, text
    for w in ("field0.tif", "uint16 pixels", "trained on uint8 images", "8-bit pixels used as they are"):
        assert w in text, (w, text)
    assert not out.exists()
    assert json.loads((quick_run / "model" / "bundle.json").read_text())["trained_on"]["source_dtypes"] == {"Image_Path_RGB": "uint8"}


def test_refuses_an_output_folder_it_did_not_write(tmp_path, monkeypatch, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    code, text = _cli(monkeypatch, capsys, "predict", tmp_path / "no-model", tmp_path, "--out", out)
    assert code == 2 and "not a cellmorph predict output" in text, text
    assert (out / "notes.txt").read_text() == "keep"


def test_mc_dropout_on_a_tiny_finetuned_bundle(tmp_path, toy_table_maker, tiny_finetune):
    toy = toy_table_maker(tmp_path)
    bundle = cm.Classifier("resnet18", init="random", mode="finetune", overrides={**tiny_finetune, "model.drop_rate": 0.5}).fit(toy).save(tmp_path / "b")
    res = cm.predict_images(bundle, toy, tmp_path / "out", mc_dropout=6)
    stds = res.images[["mcstd_bright", "mcstd_dark"]].to_numpy()
    probs = res.images[["prob_bright", "prob_dark"]].to_numpy()
    assert (stds > 0).all() and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    again = cm.predict_images(bundle, toy, mc_dropout=6)  # seeded: the same passes
    assert np.array_equal(again.images[["prob_bright", "prob_dark"]].to_numpy(), probs)
    plain = cm.predict_images(bundle, toy)
    assert not np.allclose(plain.images[["prob_bright", "prob_dark"]].to_numpy(), probs)  # dropout was active
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["mc_dropout"] == 6
    assert json.loads((tmp_path / "out" / "predict.json").read_text())["tta"] is False  # no 8-view mean here
    no_drop = cm.Classifier("resnet18", init="random", mode="finetune", overrides=tiny_finetune).fit(toy)
    with pytest.raises(cm.CellmorphError, match="no dropout"):
        cm.predict_images(no_drop, toy, mc_dropout=3)


@pytest.mark.slow
def test_report_renders_in_headless_chromium(quick_run, subset_table, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("chromium not installed: the report's rendering is checked by docs/architecture.md's manual check instead")
    _loaddata(subset_table.df.iloc[:24], tmp_path / "load.csv")
    cm.predict_images(quick_run / "model", tmp_path / "load.csv", tmp_path / "pred")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}", "--window-size=1400,1000",
                    (tmp_path / "pred" / "report.html").as_uri()], capture_output=True, timeout=120)
    im = np.asarray(Image.open(shot).convert("RGB"))
    assert im.shape[:2] == (1000, 1400)
    assert (im.std(axis=2) > 20).sum() > 10_000  # coloured pixels: the cell thumbnails were drawn


@pytest.mark.slow
def test_fold_ensemble_of_a_tiny_finetune_run(data_dir, subset_table, tmp_path, monkeypatch, capsys):
    """`--ensemble` on a tiny CPU fine-tune (resnet18 from scratch, 32 px, 1 epoch, 2 LOCO folds, fold models
    saved): each fold model, run by predict, reproduces its fold's out-of-fold probabilities, and the
    ensemble's probabilities are their mean."""
    from cellmorph.models.classifier import Classifier
    from cellmorph.config import load_config
    from cellmorph.engine.runner import run_experiment
    from cellmorph.prediction.predict import ensemble_proba, fold_models

    smoke = ["dataset.image_size=32", "model.input_size=32", "finetune.epochs=1", "finetune.save_models=true", "model.name=resnet18",
             "model.init=xavier", "finetune.eval_every_iterations=0"]
    run = tmp_path / "tiny"
    run_experiment(load_config(REPO / "configs" / "finetune-cpu-smoke.toml", smoke), run, data_dir)
    clf = Classifier.load(run / "model")
    paths = fold_models(run, clf)
    assert [p.parent.name for p in paths] == ["00", "01"]
    fold0 = pd.read_parquet(run / "folds" / "00" / "predictions.parquet")
    rows = subset_table.df[subset_table.df["Metadata_Compound"] == json.loads((run / "folds" / "00" / "fold.json").read_text())["held_out"]]
    _loaddata(rows, tmp_path / "load.csv")
    res = cm.predict_images(run, tmp_path / "load.csv", tmp_path / "pred", ensemble=True)
    from cellmorph.data.inputs import read_images
    from cellmorph.data.store import build_store

    mean, per = ensemble_proba(clf, paths, clf.as_images(build_store(read_images(tmp_path / "load.csv"), 32).images))
    np.testing.assert_allclose(res.images[PROBS].to_numpy(), mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(mean, np.mean(per, axis=0), rtol=0, atol=1e-12)
    assert not np.allclose(per[0], per[1], atol=1e-3)  # two different models were averaged
    # fold 0's model on its held-out compound (rows in table order, as the fold's): its out-of-fold probabilities
    assert len(fold0) == len(rows) and (fold0["Metadata_Well"].to_numpy() == rows["Metadata_Well"].to_numpy()).all()
    np.testing.assert_allclose(per[0], fold0[PROBS].to_numpy(), rtol=0, atol=1e-5)
    info = json.loads((tmp_path / "pred" / "predict.json").read_text())
    assert len(info["ensemble"]["fold_models"]) == 2 and info["novelty_score"] == "combined"  # the run's image reference
    assert "pre-logit" in info["novelty"]["image"]["feature_space"] and clf.image_reference["features"].shape == (len(subset_table), 512)
    code, text = _cli(monkeypatch, capsys, "predict", run / "model", tmp_path / "load.csv", "--out", tmp_path / "o", "--ensemble")
    assert code == 2 and text.count("error:") == 1 and "not a run folder" in text, text


def test_predict_new_patches_summary_says_images_once(nuclei_patches, nuclei_config, tmp_path, monkeypatch, capsys, cli):
    """Issue 24, item 7: images without wells are the unit: the summary line says "36 images" once, not "36 images,
    36 images"; the run's calibrated model gives the new patches prediction sets."""
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    (tmp_path / "cfg.toml").write_text(nuclei_config(nuclei_patches))
    code, said = cli(monkeypatch, capsys, "run", tmp_path / "cfg.toml", "--out", tmp_path / "run")
    assert code == 0, said
    code, said = cli(monkeypatch, capsys, "predict", tmp_path / "run" / "model", nuclei_patches / "new.csv", "--out", tmp_path / "new")
    assert code == 0, said
    assert "36 images;" in said and "36 images, 36 images" not in said and "images/s; at confidence 0.9: mean set size" in said
    pred = pd.read_parquet(tmp_path / "new" / "predictions.parquet")
    assert len(pred) == 36 and "prediction_set" in pred.columns and pred.Metadata_Patient.nunique() == 6
