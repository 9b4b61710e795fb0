"""`cellmorph prepare plate`: any raw plate (LoadData or folder CSV + a plate map) through the paper's preprocessing.

The dedicated BBBC021 and BBBC013 preparations are presets of the generic path; these tests give the generic path
the same plates as a user would (a LoadData CSV, a plate map) and compare the stores byte for byte. The BBBC021
plate is made of the real raw 16-bit sample field (flipped and shifted into 3 channels and 6 fields); its store's
SHA-256 was taken from the dedicated code before it became a preset (commit 8d3c5f2's parent), so the presets are
held to the old bytes too.
"""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pandas as pd
import pytest
import tifffile

from cellmorph.data.datasets.synthetic import write_bbbc021_metadata
from cellmorph.data.store import open_prepared

SAMPLE = "bbbc021-raw-sample/Week1_150607_C02_s3_w1E54F0108-F44A-4F6E-9637-6A9DE80F0823.tif"
PLATE = "Week1_90001"
WELLS = {"B02": ("DMSO", 0.0, "DMSO"), "C02": ("DMSO", 0.0, "DMSO"), "D03": ("taxol", 3.0, "Microtubule stabilizers"),
         "E05": ("AZ138", 1.0, "Eg5 inhibitors")}
CODES = {"DAPI": "w1", "Tubulin": "w2", "Actin": "w4"}


def _sample_plate(data_dir, root):
    """A BBBC021-layout plate of real raw pixels: the sample DAPI field as DAPI, flipped as Tubulin and Actin, shifted
    per field, treatment fields brighter. Returns (Broad image table, moa table, LoadData CSV, plate map CSV)."""
    raw = tifffile.imread(data_dir / SAMPLE)
    assert raw.dtype == np.uint16 and raw.shape == (1024, 1280)
    folder = root / "bbbc021-raw" / PLATE
    folder.mkdir(parents=True)
    image_rows, loaddata = [], []
    rng = np.random.default_rng(7)
    for k, (well, (compound, conc, _)) in enumerate(WELLS.items()):
        for site in (1, 2):
            planes = {"DAPI": raw, "Tubulin": raw[::-1], "Actin": raw[:, ::-1]}
            row = {"TableNumber": 1, "ImageNumber": len(image_rows) + 1}
            ld = {"Metadata_Plate": PLATE, "Metadata_Well": well, "Metadata_Site": site}
            for ch, plane in planes.items():
                plane = np.roll(plane, 97 * (2 * k + site), axis=1)
                if compound != "DMSO":
                    plane = np.clip(plane.astype(np.uint32) * 13 // 10, 0, 65535).astype(np.uint16)
                name = f"Week1_{well}_s{site}_{CODES[ch]}{str(uuid.UUID(int=int(rng.integers(1 << 62)))).upper()}.tif"
                tifffile.imwrite(folder / name, plane)
                row[f"Image_FileName_{ch}"] = name
                row[f"Image_PathName_{ch}"] = f"Week1/{PLATE}"
                ld[f"Image_FileName_{ch}"] = name
                ld[f"Image_PathName_{ch}"] = str(folder)
            row.update({"Image_Metadata_Plate_DAPI": PLATE, "Image_Metadata_Well_DAPI": well, "Replicate": 1,
                        "Image_Metadata_Compound": compound, "Image_Metadata_Concentration": conc})
            image_rows.append(row)
            loaddata.append(ld)
    image = pd.DataFrame(image_rows)
    moa = pd.DataFrame([{"compound": c, "concentration": x, "moa": m} for c, x, m in WELLS.values()])
    write_bbbc021_metadata(root / "bbbc021-metadata", image, moa)
    ld_csv = root / "load_data.csv"
    pd.DataFrame(loaddata).to_csv(ld_csv, index=False)
    pm_csv = root / "platemap.csv"
    pd.DataFrame([{"Metadata_Well": w, "Metadata_Compound": c, "Metadata_Concentration": x, "Metadata_MoA": m}
                  for w, (c, x, m) in WELLS.items()]).to_csv(pm_csv, index=False)
    return ld_csv, pm_csv


def _digest(folder):
    return hashlib.sha256((folder / "images.npy").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sample_plate(data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rawplate")
    return root, *_sample_plate(data_dir, root)


DEDICATED_BBBC021 = "b02bc3b4b35b722870042185eb0cdfca20226e50adfc55a983249d8e267c259e"  # images.npy of the dedicated code
DEDICATED_BBBC013 = "ad109471173f3733a273047f2ba044a0cf0d5ca9e0aab4f0b02fc457cc9e1f0f"  # (before it became a preset)


def test_generic_plate_equals_the_bbbc021_preparation_byte_for_byte(sample_plate, cli, monkeypatch, capsys):
    root, ld_csv, pm_csv = sample_plate
    code, out = cli(monkeypatch, capsys, "prepare", "bbbc021", "--data", root, "--out", root / "dedicated", "--workers", 2)
    assert code == 0, out
    code, out = cli(monkeypatch, capsys, "prepare", "plate", "--images", ld_csv, "--platemap", pm_csv, "--channels", "Actin,Tubulin,DAPI",
                    "--out", root / "generic", "--workers", 2)
    assert code == 0, out
    assert "plate: 16 images of 3x512x640" in out
    assert _digest(root / "dedicated") == _digest(root / "generic") == DEDICATED_BBBC021
    dedicated, generic = open_prepared(root / "dedicated"), open_prepared(root / "generic")
    shared = ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Compound", "Metadata_MoA", "Metadata_Crop"]
    pd.testing.assert_frame_equal(dedicated.index[shared], generic.index[shared], check_dtype=False)
    recipe = json.loads((root / "generic" / "prepared.json").read_text())
    assert recipe["plates"][PLATE]["control_fields"] == 4 and recipe["settings"]["normalise"] == "controls"


def test_generic_plate_equals_the_bbbc013_preparation_byte_for_byte(data_dir, tmp_path, cli, monkeypatch, capsys):
    """The BBBC013 plate given as a user's folder-format CSV, through the generic reader and engine with the translocation
    settings (each field's own min-max, 4 x 4 crops, a zero channel first), equals `prepare bbbc013` and the bytes the
    dedicated code wrote; through the CLI (without the zero channel, which only the preset adds) the 2 channels match."""
    from cellmorph.data.catalog import load_dataset
    from cellmorph.data.datasets.plate import plate_fields
    from cellmorph.data.datasets.translocation import translocation_settings
    from cellmorph.data.plates import prepare_plate

    folder_csv = tmp_path / "bbbc013.csv"
    load_dataset("bbbc013", data_dir).df.to_csv(folder_csv, index=False)  # Image_Path_GFP, Image_Path_DNA, Metadata_*
    fields = plate_fields(folder_csv, by_controls=False)
    prepare_plate(fields, tmp_path / "generic", translocation_settings("bbbc013", ["GFP", "DNA"]), workers=2)
    code, out = cli(monkeypatch, capsys, "prepare", "bbbc013", "--data", data_dir, "--out", tmp_path / "dedicated")
    assert code == 0, out
    assert _digest(tmp_path / "generic") == _digest(tmp_path / "dedicated") == DEDICATED_BBBC013
    code, out = cli(monkeypatch, capsys, "prepare", "plate", "--images", folder_csv, "--normalise", "field", "--crops", "4x4",
                    "--keep-empty", "--out", tmp_path / "cli")
    assert code == 0, out
    cli_store, dedicated = open_prepared(tmp_path / "cli"), open_prepared(tmp_path / "dedicated")
    assert cli_store.images.shape == (96 * 16, 2, 160, 160)
    assert np.array_equal(cli_store.images, dedicated.images[:, 1:])
    assert cli_store.index["Metadata_Well"].tolist() == dedicated.index["Metadata_Well"].tolist()
