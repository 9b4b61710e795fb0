import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from cellmorph.data.catalog import load_dataset
from cellmorph.data.datasets.download import read_manifest, verify_manifest
from cellmorph.errors import CellmorphError


def test_subset_table_real(subset_table):
    df = subset_table.df
    assert len(df) == 660
    assert df.Metadata_Compound.nunique() == 18
    assert df.groupby(["Metadata_Compound", "Metadata_Concentration"]).ngroups == 55
    assert subset_table.classes == sorted(df.Metadata_MoA.unique()) and len(subset_table.classes) == 6
    assert df.Metadata_Plate.nunique() == 30
    assert set(df.Metadata_Batch) == {p.split("_")[0] for p in df.Metadata_Plate}
    assert df.groupby(["Metadata_Plate", "Metadata_Well"]).size().eq(4).all()
    assert df.Metadata_Site.between(1, 4).all()
    assert df.Image_Path_RGB.iloc[7].endswith("bbbc021v1_7.png")


def test_subset_checksums_real(data_dir):
    manifest = read_manifest("bbbc021-subset")
    assert len(manifest) == 661
    assert verify_manifest(data_dir / "bbbc021-subset", manifest) == []


def test_checksum_detects_change(data_dir, tmp_path):
    manifest = read_manifest("bbbc021-subset")
    labels = (data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv").read_bytes()
    (tmp_path / "bbbc021v1_labels.csv").write_bytes(labels[:-1] + b"x")
    bad = verify_manifest(tmp_path, {"bbbc021v1_labels.csv": manifest["bbbc021v1_labels.csv"], "images/bbbc021v1_0.png": manifest["images/bbbc021v1_0.png"]})
    assert bad == ["bbbc021v1_labels.csv", "images/bbbc021v1_0.png"]


def _fake_subset(tmp_path, data_dir, drop_column=None):
    root = tmp_path / "bbbc021-subset"
    (root / "images").mkdir(parents=True)
    raw = pd.read_csv(data_dir / "bbbc021-subset" / "bbbc021v1_labels.csv", sep=";", index_col=0)
    if drop_column:
        raw = raw.drop(columns=[drop_column])
    raw.to_csv(root / "bbbc021v1_labels.csv", sep=";")
    return root


def test_labels_missing_column_is_clear(tmp_path, data_dir):
    root = _fake_subset(tmp_path, data_dir, drop_column="moa")
    with pytest.raises(CellmorphError) as e:
        load_dataset("bbbc021-subset", tmp_path)
    assert str(root / "bbbc021v1_labels.csv") in str(e.value) and "'moa'" in str(e.value)


def test_unknown_dataset_and_missing_folder(tmp_path, monkeypatch):
    with pytest.raises(CellmorphError, match="unknown dataset 'bbbc0021'.*bbbc021-subset"):
        load_dataset("bbbc0021", tmp_path)
    with pytest.raises(CellmorphError, match="does not exist"):
        load_dataset("bbbc021-subset", tmp_path / "nowhere")
    monkeypatch.delenv("CELLMORPH_DATA", raising=False)
    with pytest.raises(CellmorphError, match="CELLMORPH_DATA"):
        load_dataset("bbbc021-subset", None)


def _write_folder_dataset(tmp_path, n=6, bits=16):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        for ch in ("DNA", "Actin"):
            img = rng.integers(0, 4000 if bits == 16 else 255, size=(40, 48)).astype(np.uint16 if bits == 16 else np.uint8)
            tifffile.imwrite(tmp_path / f"f{i}_{ch}.tif", img)
        rows.append(
            {
                "Image_Path_DNA": f"f{i}_DNA.tif",
                "Image_Path_Actin": f"f{i}_Actin.tif",
                "Metadata_Plate": "P1",
                "Metadata_Well": f"B0{i}",
                "Metadata_Compound": f"c{i % 3}",
                "Metadata_Concentration": 1.0,
                "Metadata_MoA": "A" if i % 3 else "B",
            }
        )
    pd.DataFrame(rows).to_csv(tmp_path / "plates.csv", index=False)


def test_folder_dataset_16bit_tiffs(tmp_path):
    from cellmorph.data.store import build_store

    _write_folder_dataset(tmp_path)
    table = load_dataset("folder", tmp_path, csv="plates.csv")
    assert table.path_columns == ["Image_Path_DNA", "Image_Path_Actin"]
    store = build_store(table, image_size=32, cache=tmp_path / "cache")
    assert store.images.shape == (6, 2, 32, 32) and store.images.dtype == np.uint8
    assert store.images.max() > 200 and store.images.min() < 50  # 16-bit range stretched to 8-bit


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(CellmorphError, match="needs dataset.options"):
        load_dataset("folder", tmp_path)
    _write_folder_dataset(tmp_path)
    (tmp_path / "f3_DNA.tif").unlink()
    with pytest.raises(CellmorphError, match="f3_DNA.tif.*does not exist"):
        load_dataset("folder", tmp_path, csv="plates.csv")
    df = pd.read_csv(tmp_path / "plates.csv").drop(columns=["Metadata_MoA"])
    df.to_csv(tmp_path / "nolabel.csv", index=False)
    with pytest.raises(CellmorphError, match="missing column.*Metadata_MoA.*needs the label column 'Metadata_MoA'"):
        load_dataset("folder", tmp_path, csv="nolabel.csv")


def _write_nuclei_patches(tmp_path, labels):
    """A user's own nuclei-patch dataset: one CSV of patches, a label and a patient column, nothing else."""
    rng = np.random.default_rng(1)
    (tmp_path / "patches").mkdir()
    for i in range(len(labels)):
        Image.fromarray(rng.integers(0, 255, (27, 27, 3), dtype=np.uint8)).save(tmp_path / "patches" / f"n{i}.png")
    pd.DataFrame(
        {
            "Image_Path_HE": [f"patches/n{i}.png" for i in range(len(labels))],
            "Metadata_Label": labels,
            "Metadata_Patient": [f"P{i % 3}" for i in range(len(labels))],
        }
    ).to_csv(tmp_path / "nuclei.csv", index=False)


def test_folder_needs_only_paths_and_label(tmp_path):
    from cellmorph.data.store import build_store

    _write_nuclei_patches(tmp_path, ["tumour", "stroma", None, "immune", "tumour", None])
    table = load_dataset("folder", tmp_path, csv="nuclei.csv", label="Metadata_Label")
    assert table.classes == ["immune", "stroma", "tumour"]  # empty labels are no class
    assert table.df.Metadata_Label.isna().sum() == 2 and not table.has_treatments
    store = build_store(table, cache=tmp_path / "cache")
    assert store.images.shape == (6, 3, 27, 27)
    assert list(store.index.Metadata_Patient) == ["P0", "P1", "P2", "P0", "P1", "P2"]  # carried for the runner


def test_folder_labels_keep_their_text(tmp_path):
    _write_nuclei_patches(tmp_path, ["0", "1", None, "1"])  # numeric labels beside an empty cell stay "0"/"1"
    assert load_dataset("folder", tmp_path, csv="nuclei.csv", label="Metadata_Label").classes == ["0", "1"]


def test_folder_needs_two_labelled_classes(tmp_path):
    _write_nuclei_patches(tmp_path, ["tumour", None, "tumour", " "])
    with pytest.raises(CellmorphError, match=r"nuclei.csv: label column 'Metadata_Label' has fewer than 2 classes among its labelled rows \(\['tumour'\]\)"):
        load_dataset("folder", tmp_path, csv="nuclei.csv", label="Metadata_Label")


def test_folder_empty_path_cell_is_named(tmp_path):
    _write_nuclei_patches(tmp_path, ["tumour", "stroma", "immune"])
    df = pd.read_csv(tmp_path / "nuclei.csv")
    df.loc[1, "Image_Path_HE"] = None
    df.to_csv(tmp_path / "nuclei.csv", index=False)
    with pytest.raises(CellmorphError, match=r"column 'Image_Path_HE' is empty in row\(s\) \[1\]"):
        load_dataset("folder", tmp_path, csv="nuclei.csv", label="Metadata_Label")
