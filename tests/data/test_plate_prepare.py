"""`cellmorph prepare plate`: any raw plate (LoadData or folder CSV + a plate map) through the paper's preprocessing.

The dedicated BBBC021 and BBBC013 preparations are presets of the generic path; these tests give the generic path
the same plates as a user would (a LoadData CSV, a plate map) and compare the stores byte for byte. The BBBC021
plate is made of the real raw 16-bit sample field (flipped and shifted into 3 channels and 6 fields); its store's
SHA-256 was taken from the dedicated code before it became a preset (at commit 4b0ddbf), so the presets are
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


# --- a 5-channel Cell Painting-like plate, end to end -------------------------------------------------------------

CP_CHANNELS = ("DNA", "ER", "RNA", "AGP", "Mito")
CP_WELLS = {"B02": ("DMSO", 0.0, ""), "B03": ("DMSO", 0.0, ""), "C02": ("cmpA", 1.0, "up"), "C03": ("cmpA", 3.0, "up"),
            "C04": ("cmpA", 10.0, "up"), "D02": ("cmpB", 1.0, "down"), "D03": ("cmpB", 3.0, "down"), "D04": ("cmpB", 10.0, "down")}


def _cell_painting_plate(root, plates=("P1", "P2"), sites=2, shape=(96, 96), seed=0):
    """16-bit single-channel TIFFs of 5 channels per field; cmpA brightens DNA and ER, cmpB RNA. LoadData CSV + plate map.
    (Not AGP/Mito for cmpB: timm adapts an RGB first layer to 5 channels by repeating its filters, so a frozen backbone sees
    channels 1 and 4, 2 and 5 through the same filters: docs/datasets.md.)"""
    from cellmorph.data.datasets.synthetic import synthetic_field

    rng = np.random.default_rng(seed)
    rows = []
    for plate in plates:
        folder = root / plate
        folder.mkdir(parents=True, exist_ok=True)
        for well, (compound, _, _) in CP_WELLS.items():
            for site in range(1, sites + 1):
                row = {"Metadata_Plate": plate, "Metadata_Well": well, "Metadata_Site": site}
                for i, ch in enumerate(CP_CHANNELS):
                    boost = 3.0 if (compound == "cmpA" and i < 2) or (compound == "cmpB" and i == 2) else 1.0
                    name = f"{plate}_{well}_s{site}_{ch}.tif"
                    tifffile.imwrite(folder / name, synthetic_field(rng, shape, 200.0 * (i + 1) * boost, cells=6))
                    row[f"Image_FileName_{ch}"] = name
                    row[f"Image_PathName_{ch}"] = str(folder)
                rows.append(row)
    pd.DataFrame(rows).to_csv(root / "load_data.csv", index=False)
    pd.DataFrame([{"Metadata_Well": w, "Metadata_Compound": c, "Metadata_Concentration": x, "Metadata_MoA": m}
                  for w, (c, x, m) in CP_WELLS.items()]).to_csv(root / "platemap.csv", index=False)
    return root / "load_data.csv", root / "platemap.csv"


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_five_channel_plate_prepare_run_predict(tmp_path, cli, monkeypatch, capsys, tiny_finetune, mode):
    """prepare plate -> run (ImageNet EfficientNet-Lite0 adapted to 5 channels) -> predict a new plate's store."""
    ld, pm = _cell_painting_plate(tmp_path / "train")
    code, said = cli(monkeypatch, capsys, "prepare", "plate", "--images", ld, "--platemap", pm, "--crops", "1x1", "--image-size", 64,
                     "--out", tmp_path / "store")
    assert code == 0, said
    assert "plate: 24 images of 5x64x64" in said  # 2 plates x 6 treated wells x 2 sites; DMSO only normalises
    recipe = json.loads((tmp_path / "store" / "prepared.json").read_text())
    assert recipe["channels"] == list(CP_CHANNELS) and recipe["plates"]["P1"]["control_fields"] == 4
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'name = "cp"\nmode = "{mode}"\ndevice = "cpu"\nsave_model = true\n'
                   f'[dataset]\nname = "prepared"\noptions = {{path = "{tmp_path / "store"}"}}\n'
                   '[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\ninput_size = 64\n'
                   '[evaluation]\nprotocol = "logo"\ngroup = "Metadata_Plate"\n')
    sets = [x for k, v in tiny_finetune.items() for x in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")] if mode == "finetune" else []
    code, said = cli(monkeypatch, capsys, "run", cfg, "--out", tmp_path / "run", *sets)
    assert code == 0, said
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert json.loads((tmp_path / "run" / "model" / "bundle.json").read_text())["input"]["channels"] == 5
    assert metrics["levels"]["image"]["total"] == 24 and metrics["context"]["n_folds"] == 2
    new_ld, new_pm = _cell_painting_plate(tmp_path / "new", plates=("P3",), sites=1, seed=5)
    code, said = cli(monkeypatch, capsys, "prepare", "plate", "--images", new_ld, "--platemap", new_pm, "--crops", "1x1", "--image-size", 64,
                     "--out", tmp_path / "new_store")
    assert code == 0, said
    code, said = cli(monkeypatch, capsys, "predict", tmp_path / "run" / "model", tmp_path / "new_store", "--out", tmp_path / "pred")
    assert code == 0, said
    pred = pd.read_parquet(tmp_path / "pred" / "predictions.parquet")
    assert len(pred) == 6 and set(pred.Metadata_Compound) == {"cmpA", "cmpB"}
    assert np.allclose(pred[["prob_down", "prob_up"]].sum(axis=1), 1.0)
    # every channel reaches the network: the same plate with DNA and RNA swapped is predicted differently
    code, said = cli(monkeypatch, capsys, "prepare", "plate", "--images", new_ld, "--platemap", new_pm, "--crops", "1x1", "--image-size", 64,
                     "--channels", "RNA,ER,DNA,AGP,Mito", "--out", tmp_path / "swapped")
    assert code == 0, said
    code, said = cli(monkeypatch, capsys, "predict", tmp_path / "run" / "model", tmp_path / "swapped", "--out", tmp_path / "pred_swapped")
    assert code == 0, said
    swapped = pd.read_parquet(tmp_path / "pred_swapped" / "predictions.parquet")
    # (the same pixels give the same bits, models.inference: any difference is the channels; a 1-epoch network's
    # probabilities move by ~1e-4 here)
    assert np.abs(swapped["prob_up"].to_numpy() - pred["prob_up"].to_numpy()).max() > 1e-5
    # the raw files of the new plate are refused: the model was trained on prepared images
    code, said = cli(monkeypatch, capsys, "predict", tmp_path / "run" / "model", new_ld, "--out", tmp_path / "raw_pred")
    assert code == 2 and "trained on a store made by `cellmorph prepare`" in said and not (tmp_path / "raw_pred").exists()


def test_bad_plate_input_is_one_line_and_writes_nothing(tmp_path, cli, monkeypatch, capsys):
    ld, pm = _cell_painting_plate(tmp_path / "p", plates=("P1",), sites=1, shape=(32, 32))
    out = tmp_path / "store"

    def prepare(*extra, images=ld, platemap=pm):
        code, said = cli(monkeypatch, capsys, "prepare", "plate", "--images", images, "--platemap", platemap, *extra, "--out", out)
        assert code == 2 and "Traceback" not in said, said
        assert not out.exists()
        return said

    full = pd.read_csv(pm)
    full[full.Metadata_Well != "C03"].to_csv(tmp_path / "short_map.csv", index=False)
    said = prepare(platemap=tmp_path / "short_map.csv")
    assert "no row for 1 well(s) that have images: ['P1 C03']" in said and "short_map.csv" in said
    table = pd.read_csv(ld)
    table.loc[3, "Image_FileName_Mito"] = None
    table.to_csv(tmp_path / "gap.csv", index=False)
    said = prepare(images=tmp_path / "gap.csv")
    assert "Image_FileName_Mito" in said and "row(s) [3]" in said
    full.assign(Metadata_Compound=full.Metadata_Compound.replace("DMSO", "water")).to_csv(tmp_path / "no_dmso.csv", index=False)
    said = prepare(platemap=tmp_path / "no_dmso.csv")
    assert "plate(s) ['P1'] have no control wells (Metadata_Compound = DMSO)" in said and "--controls" in said
    said = prepare("--channels", "DNA,Actin")
    assert "--channels: ['Actin'] not in" in said and "'Mito'" in said
    said = prepare("--crops", "two")
    assert "--crops two: write ROWSxCOLUMNS" in said
    tifffile.imwrite(tmp_path / "p" / "P1" / "P1_C02_s1_ER.tif", np.zeros((32, 32), np.float32))
    said = prepare()
    assert "P1_C02_s1_ER.tif" in said and "float32" in said
    # the same plate without the plate map's controls, by each field's own min-max, needs none
    code, said = cli(monkeypatch, capsys, "prepare", "plate", "--images", ld, "--platemap", tmp_path / "no_dmso.csv", "--normalise", "field",
                     "--channels", "DNA,RNA", "--crops", "1x1", "--out", out)
    assert code == 0 and "plate: 8 images of 2x32x32" in said, said


def test_illumination_correction_flattens_a_vignetted_plate(tmp_path):
    """A plate whose every field is darker at the left (a vignette): with --illumination plate the control statistics and
    the crops no longer depend on the position in the field."""
    from cellmorph.data.datasets.plate import plate_fields
    from cellmorph.data.plates import PlateSettings, illumination_function, prepare_plate
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(1)
    ramp = np.linspace(0.4, 1.0, 64)[None, :]
    rows = []
    for k, well in enumerate(["B02", "B03", "C02", "C03"]):
        path = tmp_path / f"{well}.tif"
        tifffile.imwrite(path, np.clip(rng.poisson(1000, size=(64, 64)) * ramp, 0, 65535).astype(np.uint16))
        rows.append({"Metadata_Plate": "P", "Metadata_Well": well, "Image_Path_DNA": str(path),
                     "Metadata_Compound": "DMSO" if k < 2 else "x"})
    pd.DataFrame(rows).to_csv(tmp_path / "t.csv", index=False)
    fields = plate_fields(tmp_path / "t.csv")
    settings = PlateSettings(channels=("DNA",), normalise="controls", grid=(1, 2), drop_empty=False, illumination="plate")
    with ThreadPoolExecutor(1) as pool:
        illum = illumination_function(fields[["Image_Path_DNA"]].values.tolist(), settings, pool, 1)
    assert illum.shape == (1, 64, 64) and illum[0, :, -1].mean() / illum[0, :, 0].mean() == pytest.approx(2.5, rel=0.1)
    recipe = prepare_plate(fields, tmp_path / "flat", settings, workers=1)
    flat = open_prepared(tmp_path / "flat").images
    plain = PlateSettings(channels=("DNA",), normalise="controls", grid=(1, 2), drop_empty=False)
    prepare_plate(fields, tmp_path / "raw", plain, workers=1)
    raw = open_prepared(tmp_path / "raw").images
    left_right = lambda imgs: imgs[0::2].mean() / imgs[1::2].mean()  # crop 1 = left half, crop 2 = right half
    assert left_right(raw) < 0.75 and left_right(flat) == pytest.approx(1.0, abs=0.1)
    assert recipe["settings"]["illumination"] == "plate" and "illumination correction" in recipe["preprocessing"]


def test_an_ome_zarr_plate_prepares_to_the_same_store_as_its_tiffs(tmp_path, cli, monkeypatch, capsys):
    """The 5-channel 16-bit plate written as TIFFs (LoadData CSV) and as an OME-Zarr HCS plate (ome-zarr-py): the same
    prepared bytes through `prepare plate`, with the same plate map."""
    from cellmorph.data.omezarr import write_plate

    ld, pm = _cell_painting_plate(tmp_path / "tiff", plates=("P1",), sites=2, shape=(48, 48))
    table = pd.read_csv(ld)
    images = {}
    for r in table.itertuples(index=False):
        row = r.Metadata_Well[0]
        planes = [tifffile.imread(f"{getattr(r, f'Image_PathName_{c}')}/{getattr(r, f'Image_FileName_{c}')}") for c in CP_CHANNELS]
        images[(row, int(r.Metadata_Well[1:]), r.Metadata_Site - 1)] = np.stack(planes)
    write_plate(tmp_path / "P1.zarr", images, list(CP_CHANNELS), "P1")
    for name, source in (("tiff", ld), ("zarr", tmp_path / "P1.zarr")):
        code, said = cli(monkeypatch, capsys, "prepare", "plate", "--images", source, "--platemap", pm, "--crops", "2x2", "--keep-empty",
                         "--out", tmp_path / f"store_{name}")
        assert code == 0, said
    assert _digest(tmp_path / "store_tiff") == _digest(tmp_path / "store_zarr")
    idx = [open_prepared(tmp_path / f"store_{n}").index[["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Crop"]] for n in ("tiff", "zarr")]
    pd.testing.assert_frame_equal(*idx, check_dtype=False)


def test_a_failed_prepare_resumes_plate_by_plate(tmp_path, cli, monkeypatch, capsys):
    """Plate P2 has a damaged file: the prepare stops (no store), P1's finished crops wait in the cache; once the file
    is restored the next prepare takes P1 as it was, prepares P2, and gives the same bytes as a clean run."""
    from cellmorph.data.plates import segments_folder

    ld, pm = _cell_painting_plate(tmp_path / "p", plates=("P1", "P2"), sites=1, shape=(32, 32))
    args = ["prepare", "plate", "--images", ld, "--platemap", pm, "--crops", "1x1"]
    code, said = cli(monkeypatch, capsys, *args, "--out", tmp_path / "clean")
    assert code == 0, said
    bad = tmp_path / "p" / "P2" / "P2_C03_s1_ER.tif"
    good = bad.read_bytes()
    bad.write_bytes(good[:100])
    out = tmp_path / "store"
    code, said = cli(monkeypatch, capsys, *args, "--out", out)
    assert code == 2 and "P2_C03_s1_ER.tif" in said and not (out / "prepared.json").exists()
    finished = list(segments_folder(out).glob("*/plate.json"))
    assert len(finished) == 1 and json.loads(finished[0].read_text())["summary"]["fields"] == 6
    bad.write_bytes(good)
    code, said = cli(monkeypatch, capsys, *args, "--out", out)
    assert code == 0 and "resumed: 1 plate(s) prepared by an earlier run taken as they were (P1)" in said, said
    assert _digest(out) == _digest(tmp_path / "clean")
    assert json.loads((out / "prepared.json").read_text())["resumed_plates"] == ["P1"]
    assert not segments_folder(out).exists()  # the store is complete: the waiting copies are gone


def test_prepare_writes_ome_zarr_plates_of_its_store(tmp_path, cli, monkeypatch, capsys):
    """--ome-zarr: each plate of the prepared store as an OME-Zarr HCS plate (ome-zarr-py), every crop a field of its
    well, byte for byte the store's images, with a plate map of the store's per-well metadata; the plate trains through
    `cellmorph run` (dataset omezarr). A folder that is not new or empty is refused before anything is prepared."""
    from cellmorph.data.omezarr import plate_fields, read_zarr_plane

    ld, pm = _cell_painting_plate(tmp_path / "p", plates=("P1", "P2"), sites=1, shape=(64, 64))
    code, said = cli(monkeypatch, capsys, "prepare", "plate", "--images", ld, "--platemap", pm, "--crops", "2x2",
                     "--out", tmp_path / "store", "--ome-zarr", tmp_path / "zarr")
    assert code == 0, said
    assert "OME-Zarr: 2 plate(s)" in said and sorted(p.name for p in (tmp_path / "zarr").iterdir()) == ["P1.zarr", "P2.zarr", "platemap.csv"]
    store = open_prepared(tmp_path / "store")
    images, index = np.load(tmp_path / "store" / "images.npy"), store.index
    for plate in ("P1", "P2"):
        fields = plate_fields(tmp_path / "zarr" / f"{plate}.zarr")
        rows = index[index["Metadata_Plate"] == plate]
        assert len(fields) == len(rows) and list(fields["Metadata_Plate"].unique()) == [plate]
        assert sorted(fields["Metadata_Well"]) == sorted(rows["Metadata_Well"])
        for well, got in fields.groupby("Metadata_Well"):
            want = images[rows.index[rows["Metadata_Well"] == well]]  # the well's crops in store order = its fields in order
            planes = np.stack([np.stack([read_zarr_plane(r[f"Image_Path_{c}"])[..., 0] for c in CP_CHANNELS]) for _, r in got.iterrows()])
            assert planes.dtype == np.uint8 and np.array_equal(planes, want)
    platemap = pd.read_csv(tmp_path / "zarr" / "platemap.csv")
    assert len(platemap) == 12 and {"Metadata_Compound", "Metadata_Concentration"} <= set(platemap.columns)  # 6 treatment wells x 2 plates
    assert "Metadata_Crop" not in platemap.columns and "Metadata_Site" not in platemap.columns  # a crop's, a field's: not a well's

    # the exported plate is an input like any other: it trains through `run`
    (tmp_path / "cfg.toml").write_text(
        'name = "zarr-out"\nmode = "frozen"\ndevice = "cpu"\n[dataset]\nname = "omezarr"\nimage_size = 32\nlabel = "Metadata_Compound"\n'
        f'options = {{path = "{tmp_path / "zarr" / "P1.zarr"}", platemap = "{tmp_path / "zarr" / "platemap.csv"}"}}\n'
        '[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\ninput_size = 32\n[frozen]\nbatch_size = 8\n'
        '[evaluation]\nprotocol = "random"\n')
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    code, said = cli(monkeypatch, capsys, "run", tmp_path / "cfg.toml", "--out", tmp_path / "run", "--set", "save_model=false")
    assert code == 0, said
    assert len(pd.read_parquet(tmp_path / "run" / "predictions.parquet")) > 0

    # a folder with something in it: refused at once, naming it; no store is prepared
    code, said = cli(monkeypatch, capsys, "prepare", "plate", "--images", ld, "--platemap", pm, "--out", tmp_path / "store2",
                     "--ome-zarr", tmp_path / "zarr")
    assert code == 2 and "is not an empty folder" in said and str(tmp_path / "zarr") in said
    assert not (tmp_path / "store2").exists() and (tmp_path / "zarr" / "P1.zarr").is_dir()


def test_a_sigkilled_prepare_resumes_with_the_plates_it_finished(tmp_path, cli, monkeypatch, capsys):
    """SIGKILL (no clean-up runs) once the first plate is finished: no store appears in --out, and the next prepare takes
    the finished plates as they were (a plate cut off mid-write is prepared again) and gives the same bytes as a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from cellmorph.data.plates import segments_folder

    ld, pm = _cell_painting_plate(tmp_path / "p", plates=("P1", "P2", "P3", "P4"), sites=2, shape=(256, 256))
    args = ["prepare", "plate", "--images", str(ld), "--platemap", str(pm), "--crops", "2x2", "--workers", "1"]
    code, said = cli(monkeypatch, capsys, *args, "--out", tmp_path / "clean")
    assert code == 0, said
    out = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "cellmorph", *args, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(segments_folder(out).glob("*/plate.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(segments_folder(out).glob("*/plate.json")))
    assert 1 <= finished < 4, "the prepare finished (or never finished a plate) before it could be killed"
    assert not (out / "prepared.json").exists()  # no store, not even a partial one, where the user looks
    code, said = cli(monkeypatch, capsys, *args, "--out", out)
    assert code == 0 and f"resumed: {finished} plate(s) prepared by an earlier run" in said, said
    assert _digest(out) == _digest(tmp_path / "clean")
    assert not segments_folder(out).exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
