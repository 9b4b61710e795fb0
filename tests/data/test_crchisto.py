"""The CRCHistoPhenotypes nucleus table and its patch store, on the real .mat files and H&E images."""

import numpy as np
import pytest
from PIL import Image

from cellmorph.data.catalog import load_dataset
from cellmorph.data.datasets.crchisto import read_centres
from cellmorph.errors import CellmorphError
from cellmorph.data.store import build_store
from cellmorph.data.stream import cut_patches


def test_nucleus_table_counts_real(crchisto_table, data_dir):
    df = crchisto_table.df
    # The published counts: 20,405 nuclei in the three classes of Bayramoglu & Heikkilae.
    assert len(df) == 20405
    assert df.Metadata_Label.value_counts().to_dict() == {"epithelial": 7722, "inflammatory": 6971, "fibroblast": 5712}
    assert crchisto_table.classes == ["epithelial", "fibroblast", "inflammatory"]
    # img74 and img76 hold only "others" nuclei
    assert df.Metadata_Image.nunique() == 98 and crchisto_table.patch_size == 32
    assert not crchisto_table.has_treatments
    # 1-based sub-pixel x, y -> 0-based integer column, row inside the 500 x 500 image
    assert df.Metadata_Center_X.between(0, 499).all() and df.Metadata_Center_Y.between(0, 499).all()
    row = df.iloc[0]
    assert row.Metadata_Center_X == min(max(int(np.rint(row.Metadata_X)) - 1, 0), 499)
    with_others = load_dataset("crchisto", data_dir, label="Metadata_Label", include_others=True)
    assert len(with_others) == 22444 and with_others.df.Metadata_Label.value_counts()["others"] == 2039
    assert with_others.df.Metadata_Image.nunique() == 100


def test_all_marked_nuclei_count_real(data_dir):
    root = data_dir / "crchistophenotypes"
    total = sum(len(read_centres(root / f"img{i}" / f"img{i}_detection.mat")) for i in range(1, 101))
    assert total == 29756  # the Readme's count of marked nuclei


def test_patch_store_cuts_around_centres_real(crchisto_table, tmp_path):
    store = build_store(crchisto_table, cache=tmp_path)
    assert store.images.shape == (20405, 3, 32, 32) and store.images.dtype == np.uint8
    df = store.index
    image = np.asarray(Image.open(df.Image_Path_HE.iloc[0]))  # H x W x 3
    for i in (0, 1234, 20404):
        r = df.iloc[i]
        img = image if r.Image_Path_HE == df.Image_Path_HE.iloc[0] else np.asarray(Image.open(r.Image_Path_HE))
        # the centre pixel sits at (16, 16) of its patch
        assert (store.images[i][:, 16, 16] == img[r.Metadata_Center_Y, r.Metadata_Center_X]).all()
    # cached: a second build reads the same array back
    again = build_store(crchisto_table, cache=tmp_path)
    assert again.key == store.key and np.array_equal(again.images[:50], store.images[:50])
    # another patch size is another store
    small = load_dataset("crchisto", crchisto_table.source.rsplit("/", 1)[0], label="Metadata_Label", patch_size=16, max_images=2)
    assert build_store(small, cache=tmp_path).images.shape[1:] == (3, 16, 16)


def test_patches_at_the_border_are_mirrored():
    img = np.arange(3 * 10 * 12, dtype=np.uint8).reshape(3, 10, 12)
    p = cut_patches(img, np.array([0, 11, 5]), np.array([0, 9, 4]), 6)
    assert p.shape == (3, 3, 6, 6)
    assert (p[0][:, 3, 3] == img[:, 0, 0]).all() and (p[1][:, 3, 3] == img[:, 9, 11]).all()
    assert (p[0][:, 3, 2] == img[:, 0, 1]).all()  # reflect: the pixel left of column 0 is column 1
    assert (p[2] == img[:, 1:7, 2:8]).all()  # an inner patch is a plain crop
    with pytest.raises(ValueError):
        cut_patches(img, np.array([12]), np.array([0]), 6)


def test_bad_options_and_folder(tmp_path, data_dir):
    with pytest.raises(CellmorphError, match="Metadata_Label"):
        load_dataset("crchisto", data_dir)  # the default label name is a drug screen's
    with pytest.raises(CellmorphError, match="patch_size"):
        load_dataset("crchisto", data_dir, label="Metadata_Label", patch_size=2)
    with pytest.raises(CellmorphError, match="no imgN/ folders"):
        load_dataset("crchisto", tmp_path, label="Metadata_Label")
    (tmp_path / "crchistophenotypes" / "img1").mkdir(parents=True)
    Image.new("RGB", (20, 20)).save(tmp_path / "crchistophenotypes" / "img1" / "img1.png")
    with pytest.raises(CellmorphError, match="img1_epithelial.mat"):
        load_dataset("crchisto", tmp_path, label="Metadata_Label")
