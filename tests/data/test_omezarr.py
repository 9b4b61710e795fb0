"""OME-Zarr HCS plates as input (issue 22, item 2), on real BBBC021 subset fields split into their three channels:
a plate written with ome-zarr-py reads back plane for plane; the same fields given as single-channel PNGs and as a
plate predict alike; a plate with a plate map trains through `cellmorph run`; bad plates fail naming the plate."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import cellmorph as cm
from cellmorph.data.omezarr import is_zarr_ref, plate_fields, write_plate
from cellmorph.data.preprocess import image_dtype, read_image
from cellmorph.errors import CellmorphError

CHANNELS = ["Actin", "Tubulin", "DAPI"]  # the subset's R, G, B
PROBS = "prob_"


@pytest.fixture(scope="module")
def plate_world(subset_table, tmp_path_factory):
    """8 real fields (4 wells of 2 MoAs, 2 compounds each, 2 sites per well) written twice: as single-channel PNGs with
    a folder-format CSV (fields.csv) and as an OME-Zarr plate (plate.zarr), with a plate map (platemap.csv)."""
    df = subset_table.df
    chosen = []
    for moa in sorted(df["Metadata_MoA"].unique())[:2]:
        for compound in sorted(df.loc[df["Metadata_MoA"] == moa, "Metadata_Compound"].unique())[:2]:
            well = df[df["Metadata_Compound"] == compound].groupby(["Metadata_Plate", "Metadata_Well"]).head(2).iloc[:2]
            chosen.append(well)
    root = tmp_path_factory.mktemp("omezarr")
    (root / "png").mkdir()
    images, rows, platemap = {}, [], []
    for col, well in enumerate(chosen, start=2):
        first = well.iloc[0]
        platemap.append({"Metadata_Well": f"B{col:02d}", "Metadata_Compound": first["Metadata_Compound"],
                         "Metadata_Concentration": first["Metadata_Concentration"], "Metadata_MoA": first["Metadata_MoA"]})
        for field, (_, row) in enumerate(well.iterrows()):
            rgb = np.asarray(Image.open(row["Image_Path_RGB"]).convert("RGB"))
            images[("B", col, field)] = np.ascontiguousarray(rgb.transpose(2, 0, 1))
            out = {"Metadata_Plate": "P1", "Metadata_Well": f"B{col:02d}", "Metadata_Site": field + 1}
            for c, name in enumerate(CHANNELS):
                path = root / "png" / f"B{col:02d}_s{field + 1}_{name}.png"
                Image.fromarray(rgb[:, :, c]).save(path)
                out[f"Image_Path_{name}"] = str(path)
            rows.append(out)
    pd.DataFrame(rows).to_csv(root / "fields.csv", index=False)
    pd.DataFrame(platemap).to_csv(root / "platemap.csv", index=False)
    write_plate(root / "plate.zarr", images, CHANNELS, plate_name="P1")
    return root, images


def test_round_trip_plate_fields_and_planes(plate_world):
    from cellmorph.data import omezarr, table

    assert omezarr.PATH_PREFIX == table.PATH_PREFIX  # one fact, written twice only because table imports omezarr
    root, images = plate_world
    fields = plate_fields(root / "plate.zarr")
    assert fields.columns.tolist() == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", *[f"Image_Path_{c}" for c in CHANNELS]]
    assert fields["Metadata_Plate"].eq("P1").all() and len(fields) == 8
    assert fields["Metadata_Well"].tolist() == [w for w in ("B02", "B03", "B04", "B05") for _ in range(2)]
    assert fields["Metadata_Site"].tolist() == [1, 2] * 4
    assert fields["Image_Path_DAPI"].iloc[2] == f"{(root / 'plate.zarr').resolve()}/B/3/0#c=2"
    for _, row in fields.iterrows():
        key = ("B", int(row["Metadata_Well"][1:]), row["Metadata_Site"] - 1)
        for c, name in enumerate(CHANNELS):
            ref = row[f"Image_Path_{name}"]
            assert is_zarr_ref(ref) and image_dtype(ref) == "uint8"
            plane = read_image(ref)
            assert plane.shape == (*images[key].shape[1:], 1) and np.array_equal(plane[:, :, 0], images[key][c])


def test_a_plate_without_its_name_is_named_by_its_folder(tmp_path):
    write_plate(tmp_path / "screen7.zarr", {("A", 1, 0): np.zeros((1, 8, 8), np.uint16)}, ["DNA"])
    fields = plate_fields(tmp_path / "screen7.zarr")
    assert fields.iloc[0].tolist()[:3] == ["screen7", "A01", 1] and "Image_Path_DNA" in fields


def test_zarr_and_png_inputs_predict_alike(plate_world, screen_world, tmp_path, monkeypatch, capsys, cli):
    """Acceptance: the same fields as single-channel PNGs and as an OME-Zarr plate agree to 1e-6; the CLI reads the plate."""
    root, _ = plate_world
    bundle = screen_world / "bundle"
    keys = ["Metadata_Well", "Metadata_Site"]
    png = cm.predict_images(bundle, root / "fields.csv").images.sort_values(keys).reset_index(drop=True)
    zarr = cm.predict_images(bundle, root / "plate.zarr").images.sort_values(keys).reset_index(drop=True)
    probs = [c for c in png.columns if c.startswith(PROBS)]
    assert len(probs) >= 2 and len(png) == len(zarr) == 8
    assert png[keys].equals(zarr[keys])
    np.testing.assert_allclose(zarr[probs].to_numpy(float), png[probs].to_numpy(float), atol=1e-6, rtol=0)
    code, said = cli(monkeypatch, capsys, "predict", bundle, root / "plate.zarr", "--out", tmp_path / "pred")
    assert code == 0, said
    written = pd.read_parquet(tmp_path / "pred" / "predictions.parquet").sort_values(keys).reset_index(drop=True)
    assert written["Metadata_Plate"].eq("P1").all() and written[keys].equals(zarr[keys])
    np.testing.assert_allclose(written[probs].to_numpy(float), zarr[probs].to_numpy(float), atol=1e-6, rtol=0)


def test_a_plate_with_a_plate_map_trains_through_run(plate_world, tmp_path, monkeypatch, capsys, cli):
    root, _ = plate_world
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)  # absolute paths: no data folder needed
    (tmp_path / "cfg.toml").write_text(
        'name = "zarr"\nmode = "frozen"\ndevice = "cpu"\n[dataset]\nname = "omezarr"\nimage_size = 32\n'
        f'options = {{path = "{root / "plate.zarr"}", platemap = "{root / "platemap.csv"}"}}\n'
        '[model]\nname = "tf_efficientnet_lite0"\ninit = "imagenet"\ninput_size = 32\n[frozen]\nbatch_size = 8\n'
        '[evaluation]\nprotocol = "loco"\n')
    code, said = cli(monkeypatch, capsys, "run", tmp_path / "cfg.toml", "--out", tmp_path / "run", "--set", "save_model=false")
    assert code == 0, said
    assert "4 folds" in said and "image accuracy" in said
    pred = pd.read_parquet(tmp_path / "run" / "predictions.parquet")
    assert len(pred) == 8 and set(pred["Metadata_Compound"]) == set(pd.read_csv(root / "platemap.csv")["Metadata_Compound"])


# --- bad input: one CellmorphError naming the plate and the fix ----------------------------------------------


def _small_plate(folder, dtype=np.uint8):
    return write_plate(folder, {(r, c, f): np.full((2, 16, 16), 7, dtype) for r, c in (("A", 1), ("A", 2)) for f in range(2)}, ["DNA", "RNA"])


def test_a_missing_field_is_named(tmp_path):
    plate = _small_plate(tmp_path / "p.zarr")
    shutil.rmtree(plate / "A" / "2" / "1")
    with pytest.raises(CellmorphError) as err:
        plate_fields(plate)
    msg = str(err.value)
    assert "missing field" in msg and str(plate.resolve()) in msg and "A/2/1" in msg and "remove it from its well's metadata" in msg


def test_a_float_plate_is_refused(tmp_path):
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    group = zarr.open_group(str(tmp_path / "float.zarr"), mode="w")
    write_plate_metadata(group, ["A"], ["1"], ["A/1"], name="floaty")
    well = group.require_group("A").require_group("1")
    write_well_metadata(well, ["0"])
    write_image(np.random.default_rng(0).random((2, 16, 16)).astype(np.float32), well.require_group("0"), axes="cyx", scale_factors=[])
    with pytest.raises(CellmorphError) as err:
        plate_fields(tmp_path / "float.zarr")
    msg = str(err.value)
    assert "float32" in msg and "floating-point" in msg and str((tmp_path / "float.zarr").resolve()) in msg and "uint8 or uint16" in msg


def test_a_zarr_that_is_not_a_plate_is_refused(tmp_path, monkeypatch, capsys, cli):
    import zarr
    from ome_zarr.writer import write_image

    write_image(np.zeros((1, 16, 16), np.uint8), zarr.open_group(str(tmp_path / "image.zarr"), mode="w"), axes="cyx", scale_factors=[])
    with pytest.raises(CellmorphError) as err:
        plate_fields(tmp_path / "image.zarr")
    assert "not an OME-Zarr HCS plate (no plate metadata)" in str(err.value) and str((tmp_path / "image.zarr").resolve()) in str(err.value)
    code, said = cli(monkeypatch, capsys, "predict", tmp_path / "no-bundle", tmp_path / "image.zarr")
    assert code == 2 and "Traceback" not in said


def test_a_stack_is_refused_naming_the_ref(tmp_path):
    import zarr
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    group = zarr.open_group(str(tmp_path / "stack.zarr"), mode="w")
    write_plate_metadata(group, ["A"], ["1"], ["A/1"])
    well = group.require_group("A").require_group("1")
    write_well_metadata(well, ["0"])
    write_image(np.zeros((1, 3, 16, 16), np.uint16), well.require_group("0"), axes="czyx", scale_factors=[])
    with pytest.raises(CellmorphError, match="Z = 3.*single-plane fields"):
        plate_fields(tmp_path / "stack.zarr")


def test_the_data_fingerprint_follows_the_plane_content(tmp_path):
    """A plane rewritten in place gives another store key (its pixels are hashed), an untouched plate the same one."""
    import zarr

    from cellmorph.data.store import store_key
    from cellmorph.data.table import ImageTable

    plate = _small_plate(tmp_path / "p.zarr")
    fields = plate_fields(plate).assign(Metadata_MoA=["a", "b"] * 2)
    table = ImageTable(fields, name="zarr", required=())
    before = store_key(table, 0, tmp_path / "cache")
    assert store_key(table, 0, tmp_path / "cache") == before
    zarr.open_array(str(plate / "A" / "2" / "1" / "s0"), mode="r+")[1, 3, 3] = 200
    assert read_image(fields["Image_Path_RNA"].iloc[3])[3, 3, 0] == 200
    assert store_key(table, 0, tmp_path / "cache") != before


def test_an_ome_ngff_04_plate_in_zarr_v2_reads_quietly(tmp_path, caplog):
    """Plates written before OME-NGFF 0.5 (zarr v2, 0.4 metadata) read the same, without a warning per group; a
    czyx field with Z = 1 is a single plane."""
    import zarr
    from ome_zarr.format import FormatV04
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    planes = np.arange(2 * 20 * 30, dtype=np.uint16).reshape(2, 1, 20, 30)
    group = zarr.open_group(str(tmp_path / "v04.zarr"), mode="w", zarr_format=2)
    write_plate_metadata(group, ["A"], ["1"], ["A/1"], fmt=FormatV04())
    well = group.require_group("A").require_group("1")
    write_well_metadata(well, ["0"], fmt=FormatV04())
    write_image(planes, well.require_group("0"), axes="czyx", scale_factors=[], fmt=FormatV04())
    fields = plate_fields(tmp_path / "v04.zarr")
    assert fields.columns.tolist()[-2:] == ["Image_Path_C0", "Image_Path_C1"] and fields["Metadata_Well"].tolist() == ["A01"]
    assert np.array_equal(read_image(fields["Image_Path_C1"].iloc[0])[:, :, 0], planes[1, 0]) and image_dtype(fields["Image_Path_C0"].iloc[0]) == "uint16"
    assert "version mismatch" not in caplog.text
