from pathlib import Path
"""Translocation datasets (real BBBC013 plate; BBBC014 layout on a synthetic plate), the 4PL / Z' maths,
and the translocation config of the one runner end to end on CPU at a tiny size."""

import json
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellmorph.data.catalog import load_dataset
from cellmorph.data.datasets.bbbc013 import LABEL
from cellmorph.reporting.doseresponse import fit_logistic4, logistic4, z_prime
from cellmorph.errors import CellmorphError
from cellmorph.data.datasets.translocation import prepare_translocation, translocation_crops
from cellmorph.data.store import open_prepared

REPO = Path(__file__).resolve().parents[2]


def test_bbbc013_table_labels_and_folds(data_dir):
    t = load_dataset("bbbc013", data_dir)
    df = t.df
    assert len(df) == 96 and t.label == LABEL
    counts = df[LABEL].value_counts().to_dict()
    # 4 highest dose indices (7-10) and 4 lowest (0-3) of SBS_Doses; controls read from the metadata
    assert counts == {"not translocated": 40, "translocated": 32, "middle": 24}
    assert set(df.loc[df.Metadata_Control == "positive", "Metadata_Well"]) == {f"{r}12" for r in "ABCD"} | {f"{r}01" for r in "EFGH"}
    assert (df.loc[df.Metadata_Control == "positive", LABEL] == "translocated").all()
    assert (df.loc[df.Metadata_Control == "negative", LABEL] == "not translocated").all()
    assert df.groupby("Metadata_Fold").Metadata_Row.agg(lambda s: "".join(sorted(set(s)))).tolist() == ["ABCD", "EFGH"]


def test_bbbc013_preprocessing_matches_formula(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    t = load_dataset("bbbc013", data_dir)
    row = t.df.iloc[40]
    gfp = np.asarray(Image.open(row.Image_Path_GFP))
    dna = np.asarray(Image.open(row.Image_Path_DNA))
    assert gfp.dtype == np.uint8 and gfp.shape == (640, 640)
    crops = translocation_crops(np.stack([gfp, dna]))
    a = 2.0 * np.sqrt(np.stack([gfp, dna]).astype(np.float64) + 3.0 / 8.0)
    ref = ((a - a.min()) * 255.0 / (a.max() - a.min())).astype(np.uint8)
    assert len(crops) == 16 and crops[0].shape == (3, 160, 160)
    assert np.array_equal(crops[5][1:], ref[:, 160:320, 160:320]) and not crops[5][0].any()  # row 2, column 2
    from cellmorph.cli import main

    sys.argv = ["cellmorph", "prepare", "bbbc013", "--data", str(data_dir), "--out", str(tmp_path / "b13")]
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    s = open_prepared(tmp_path / "b13")
    assert s.images.shape == (96 * 16, 3, 160, 160)
    i = np.flatnonzero((s.index.Metadata_Well == row.Metadata_Well) & (s.index.Metadata_Crop == 6))[0]
    assert np.array_equal(s.images[i], crops[5])
    # the translocation config's folds: plate halves; middle doses unlabelled, so never trained on
    from cellmorph.config import EvaluationConfig
    from cellmorph.evaluation.protocols import make_folds
    from cellmorph.data.datasets.translocation import translocation_labels

    index = s.index.assign(**{LABEL: translocation_labels(s.index[LABEL])})
    folds, excluded, _ = make_folds(index, LABEL, EvaluationConfig(protocol="predefined", group="Metadata_Fold"))
    assert not excluded and len(folds) == 2
    for f in folds:
        assert len(f.train) == 36 * 16 and len(f.test) == 48 * 16


def _write_bbbc014(root, fmt="BMP", drop=None):
    rng = np.random.default_rng(0)
    d = root / "bbbc014"
    d.mkdir(parents=True)
    n = 0
    for r in "ABCDEFGH":
        for c in range(1, 13):
            n += 1
            for ch in (1, 2):
                if drop == (r, c, ch):
                    continue
                img = rng.integers(0, 60, size=(51, 68), dtype=np.uint8)
                img[10:20, 10:20] = 200 if ch == 2 else 120
                Image.fromarray(img).save(d / f"Channel {ch}-{n:02d}-{r}-{c:02d}-00.{fmt}")
    lines = ["TNF"] + [f"10^{-7 - (c - 1) * 6 / 11:.3f}" for _ in "ABCDEFGH" for c in range(1, 13)]
    (d / "BBBC014_v1_platemap_all.txt").write_text("\r\n".join(lines))
    return d


def test_bbbc014_layout_synthetic(tmp_path):
    _write_bbbc014(tmp_path)
    t = load_dataset("bbbc014", tmp_path)
    df = t.df
    assert len(df) == 96 and df.Image_Path_FITC.str.contains("Channel 1-").all()
    assert df.loc[df.Metadata_Column <= 4, LABEL].eq("translocated").all()
    assert df.loc[df.Metadata_Column >= 9, LABEL].eq("not translocated").all()
    assert df.groupby("Metadata_Fold").Metadata_CellLine.agg(set).tolist() == [{"MCF7"}, {"A549"}]
    assert df.Metadata_Concentration.iloc[0] == pytest.approx(1e-7) and df.Metadata_Concentration.iloc[11] == pytest.approx(1e-13)
    # the paper resizes 1360x1024 to 1024x1024 before 16 crops; here 68x51 -> the same code path at a small size
    rec = prepare_translocation("bbbc014", tmp_path, tmp_path / "p14")
    assert rec["n_images"] == 96 * 16 and rec["channels"] == ["zero", "FITC", "DAPI"]
    assert rec["image_shape"] == [3, 12, 12]  # 68 x 51 -> 51 x 51 -> 16 crops of 12 x 12


def test_bbbc014_missing_well_named(tmp_path):
    _write_bbbc014(tmp_path, drop=("C", 5, 2))
    with pytest.raises(CellmorphError, match=r"1 of 96 wells lack a Channel 1 or Channel 2 image \(e.g. \['C05'\]\)"):
        load_dataset("bbbc014", tmp_path)


def test_logistic4_fit_recovers_parameters():
    rng = np.random.default_rng(1)
    x = np.repeat(np.arange(11.0), 4)
    y = logistic4(x, 0.1, 0.9, 5.3, 0.8) + rng.normal(0, 0.01, len(x))
    f = fit_logistic4(x, y)
    assert f.converged and f.r2 > 0.99
    assert f.x50 == pytest.approx(5.3, abs=0.1) and f.hill == pytest.approx(0.8, rel=0.1)
    assert f.bottom == pytest.approx(0.1, abs=0.02) and f.top == pytest.approx(0.9, abs=0.02)


def test_z_prime_formula():
    pos = np.array([0.9, 0.95, 1.0, 0.85])
    neg = np.array([0.1, 0.05, 0.0, 0.15])
    want = 1 - 3 * (np.std(pos, ddof=1) + np.std(neg, ddof=1)) / abs(pos.mean() - neg.mean())
    assert z_prime(pos, neg) == pytest.approx(want)
    assert z_prime([0.5, 0.6], [0.4, 0.55]) < 0


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, oversubscribed OpenMP threads make tiny models ~10x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_translocation_config_cpu_tiny(data_dir, tmp_path, capsys, monkeypatch, one_thread):
    """The replicate benchmark is thin: it runs configs/translocation/* through the one runner (2 seeds,
    1 epoch, 1 crop per well, 32 px) and collects; the run folder holds the dose-response outputs."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import translocation_replicates as script

    args = ["--data", str(data_dir), "--out", str(tmp_path / "run"), "--replicates", "2", "--epochs", "1",
            "--input-size", "32", "--crops-per-well", "1", "--settings", "pretrained", "--device", "cpu"]
    (line,) = script.main(args)
    assert line["benchmark"] == "translocation" and line["replicates"] == 2 and line["per_epoch"]["1"]["replicates"] == 2
    out = tmp_path / "run" / "pretrained"
    m = json.loads((out / "metrics.json").read_text())
    # 72 labelled wells (32 translocated + 40 not) per seed; the 24 middle-dose wells are predicted, never scored
    assert [s["levels"]["well"]["total"] for s in m["per_seed"]] == [72, 72]
    pred = pd.read_parquet(out / "predictions.parquet")
    assert len(pred) == 2 * 96 and set(pred.seed) == {0, 1} and (pred.Metadata_Translocation == "").sum() == 2 * 24
    assert {f.parent.name for f in out.glob("seeds/*/folds/*/predictions.parquet")} == {"00", "01"}
    dose = json.loads((out / "dose_response.json").read_text())
    assert set(dose["series"]) == {"series A-D", "series E-H"} and dose["n_wells"] == 96
    assert (out / "fig4.png").stat().st_size > 1000 and (out / "dose_response.png").stat().st_size > 1000
    report = (out / "report.html").read_text()
    assert 'src="dose_response.png"' in report and 'src="fig4.png"' in report  # the outputs' plots are in the report
    # a rerun resumes: every fold of both seeds is done, same numbers
    before = (out / "metrics.json").read_text()
    script.main(args)
    assert json.loads((out / "metrics.json").read_text())["levels"] == json.loads(before)["levels"]
