"""Raw BBBC021: the real metadata CSVs and raw TIFF, the errors a user can cause, and `cellmorph prepare`
end to end on a synthetic plate written in the Broad's folder and file-name layout."""

import os
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.cli import main
from cellmorph.data.catalog import load_dataset
from cellmorph.data.datasets.bbbc021_raw import attach_paths, read_metadata, select_fields
from cellmorph.data.datasets.synthetic import write_bbbc021_metadata, write_bbbc021_plate
from cellmorph.errors import CellmorphError
from cellmorph.data.preprocess import anscombe_stats, pixel_histogram
from cellmorph.data.datasets.bbbc021_raw import prepare_bbbc021
from cellmorph.data.prepare import read_raw_field
from cellmorph.data.store import build_store

SAMPLE = "bbbc021-raw-sample/Week1_150607_C02_s3_w1E54F0108-F44A-4F6E-9637-6A9DE80F0823.tif"


def _real_meta(data_dir):
    if not (data_dir / "bbbc021-metadata").is_dir():
        pytest.fail(f"{data_dir}/bbbc021-metadata missing: the shared data folder is incomplete")
    return read_metadata(data_dir)


def test_real_metadata_selection(data_dir):
    image, moa = _real_meta(data_dir)
    assert len(image) == 13200 and len(moa) == 104
    f = select_fields(image, moa)
    t = f[f.Metadata_Role == "treatment"]
    assert t.groupby(["Metadata_Compound", "Metadata_Concentration"]).ngroups == 103
    assert t.Metadata_MoA.nunique() == 12 and "DMSO" not in set(t.Metadata_MoA)
    assert (f.Metadata_Role == "dmso").sum() == 1320 and len(t) == 1208
    taxol = t[t.Metadata_Compound == "taxol"]  # the taxol rule: Week 1, D01-D09, 0.3/1/3 uM only
    assert len(taxol) == 36 and set(taxol.Metadata_Well) == {"D03", "D04", "D05"}
    assert taxol.Metadata_Plate.str.startswith("Week1_").all()
    assert sorted(f.Metadata_Site.unique()) == [1, 2, 3, 4]
    assert f.groupby(["Metadata_Plate", "Metadata_Well", "Metadata_Site"]).size().max() == 1


def test_real_raw_tiff_and_missing_channels(data_dir, tmp_path):
    sample = data_dir / SAMPLE
    field = read_raw_field([str(sample)], ["DAPI"])
    assert field.shape == (1, 1024, 1280) and field.dtype == np.uint16 and field.max() > 255
    mean, std = anscombe_stats(pixel_histogram(field[0], 65536))
    a = 2.0 * np.sqrt(field[0].astype(np.float64) + 0.375)
    assert mean == pytest.approx(a.mean(), rel=1e-9) and std == pytest.approx(a.std(), rel=1e-9)
    # the whole per-field path on the real 16-bit pixels (the DAPI plane as each of 3 channels, its own stats)
    from cellmorph.data.preprocess import normalize_field, zscore_tables

    field3 = np.repeat(field, 3, axis=0)
    crops, kept = normalize_field(field3, zscore_tables([mean] * 3, [std] * 3, 65536))
    z = (a - mean) / std
    ref = (z - z.min()) * 255.0 / (z.max() - z.min())
    assert [c.shape for c in crops] == [(3, 512, 640)] * 4 and all(kept)  # a DMSO field full of nuclei
    assert np.array_equal(crops[3][0], ref[512:, 640:].astype(np.uint8))
    # the sample's metadata row, against a plate folder holding only that one DAPI file
    image, moa = _real_meta(data_dir)
    f = select_fields(image, moa)
    row = f[(f.Metadata_Plate == "Week1_22123") & (f.Metadata_Well == "C02") & (f.Metadata_Site == 3)]
    assert row.FileName_DAPI.iloc[0] == sample.name
    (tmp_path / "Week1_22123").mkdir()
    os.symlink(sample, tmp_path / "Week1_22123" / sample.name)
    with pytest.raises(CellmorphError, match=r"missing channel file: .*w43361AA85.* \(Actin channel of plate Week1_22123, well C02, site 3"):
        attach_paths(row, tmp_path)
    with pytest.raises(CellmorphError, match="metadata and folder disagree: 1 plate"):
        attach_paths(f[f.Metadata_Plate == "Week2_24121"], tmp_path)


@pytest.fixture
def raw_plate(tmp_path):
    image, moa = write_bbbc021_plate(tmp_path / "bbbc021-raw", "Week1_00001", sites=1, shape=(32, 40))
    write_bbbc021_metadata(tmp_path / "bbbc021-metadata", image, moa)
    return tmp_path, image, moa


def _file(root, image, well, channel):
    r = image[image.Image_Metadata_Well_DAPI == well].iloc[0]
    return root / "bbbc021-raw" / "Week1_00001" / r[f"Image_FileName_{channel}"]


def test_error_plate_without_dmso(tmp_path):
    image, moa = write_bbbc021_plate(tmp_path / "bbbc021-raw", "Week1_00001", dmso_wells=(), sites=1, shape=(32, 40))
    write_bbbc021_metadata(tmp_path / "bbbc021-metadata", image, moa)
    with pytest.raises(CellmorphError, match=r"\['Week1_00001'\] have treatment fields but no DMSO wells"):
        prepare_bbbc021(tmp_path, tmp_path / "out")
    assert not (tmp_path / "out" / "prepared.json").exists()


def test_error_missing_wrong_depth_corrupt(raw_plate):
    root, image, _ = raw_plate
    f = _file(root, image, "D03", "Tubulin")
    good = f.read_bytes()
    f.unlink()
    with pytest.raises(CellmorphError, match=f"missing channel file: .*{f.name} \\(Tubulin channel of plate Week1_00001, well D03"):
        prepare_bbbc021(root, root / "out")
    tifffile.imwrite(f, np.zeros((32, 40), np.uint8))
    with pytest.raises(CellmorphError, match=f"{f.name}: wrong bit depth for the Tubulin channel: expected 16-bit"):
        prepare_bbbc021(root, root / "out")
    f.write_bytes(good[: len(good) // 3])
    with pytest.raises(CellmorphError, match=f"{f.name}: cannot decode image"):
        prepare_bbbc021(root, root / "out")
    assert not (root / "out" / "images.npy").exists() and not (root / "out" / "prepared.json").exists()
    assert not list((root / "out").glob(".images.npy.tmp-*"))  # no half-written store left behind


def test_error_metadata_and_folder_disagree(raw_plate):
    root, image, moa = raw_plate
    shutil.move(root / "bbbc021-raw" / "Week1_00001", root / "bbbc021-raw" / "Week1_99999")
    with pytest.raises(CellmorphError, match=r"metadata and folder disagree.*Week1_00001.*folders present: \['Week1_99999'\]"):
        prepare_bbbc021(root, root / "out")
    shutil.move(root / "bbbc021-raw" / "Week1_99999", root / "bbbc021-raw" / "Week1_00001")
    bad = image.copy()
    bad.loc[bad.Image_Metadata_Well_DAPI == "D03", "Image_Metadata_Well_DAPI"] = "D04"  # rows say D04, files say D03
    write_bbbc021_metadata(root / "bbbc021-metadata", bad, moa)
    with pytest.raises(CellmorphError, match="does not name the row's well D04"):
        prepare_bbbc021(root, root / "out")


def test_cli_prepare_then_train_reads_it(raw_plate, monkeypatch, capsys):
    root, _, _ = raw_plate
    monkeypatch.setattr(sys, "argv", ["cellmorph", "prepare", "bbbc021", "--data", str(root), "--out", str(root / "prep"), "--workers", "2"])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code in (0, None), out
    assert "bbbc021: 8 images of 3x16x20" in " ".join((out.out + out.err).split())
    table = load_dataset("prepared", root, path="prep")
    store = build_store(table)  # what `cellmorph run` does with dataset.name = "prepared"
    assert store.images.shape == (8, 3, 16, 20) and len(store.index) == 8
    assert table.classes == ["Eg5 inhibitors", "Microtubule stabilizers"]
    with pytest.raises(CellmorphError, match="prepared at 16x20 pixels but dataset.image_size = 64"):
        build_store(table, 64)
    # a bad file through the CLI: one clear line, exit 2
    for p in (root / "bbbc021-raw" / "Week1_00001").glob("*_w2*.tif"):
        p.write_bytes(b"II*\x00 truncated")
        break
    monkeypatch.setattr(sys, "argv", ["cellmorph", "prepare", "bbbc021", "--data", str(root), "--out", str(root / "prep2")])
    with pytest.raises(SystemExit) as e:
        main()
    text = " ".join(capsys.readouterr().err.split())
    assert e.value.code == 2 and "cannot decode image" in text and "Traceback" not in text


def test_run_experiment_on_prepared_store(tmp_path):
    """`cellmorph run` with dataset.name = "prepared": the store from `prepare` feeds the LOCO experiment unchanged."""
    from cellmorph.config import parse_config
    from cellmorph.engine.runner import run_experiment

    treatments = {"D03": ("taxol", 3.0, "Microtubule stabilizers"), "D05": ("docetaxel", 1.0, "Microtubule stabilizers"),
                  "E05": ("AZ138", 1.0, "Eg5 inhibitors"), "E07": ("ispinesib", 0.3, "Eg5 inhibitors")}
    image, moa = write_bbbc021_plate(tmp_path / "bbbc021-raw", "Week1_00001", treatments=treatments, sites=1, shape=(32, 40))
    write_bbbc021_metadata(tmp_path / "bbbc021-metadata", image, moa)
    rec = prepare_bbbc021(tmp_path, tmp_path / "prep", workers=1)
    cfg = parse_config({"name": "raw-smoke", "mode": "frozen", "device": "cpu",
                        "dataset": {"name": "prepared", "options": {"path": "prep"}},
                        "model": {"name": "tf_efficientnet_lite0", "init": "imagenet", "input_size": 32}})
    m = run_experiment(cfg, tmp_path / "run", tmp_path)
    assert m.context["n_folds"] == 4 and m.level("image").total == rec["n_images"] == 16 and m.level("treatment").total == 4
    pred = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert set(pred.Metadata_Crop) == {1, 2, 3, 4} and set(pred.Metadata_Plate) == {"Week1_00001"}
