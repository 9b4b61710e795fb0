import numpy as np
import pytest
from PIL import Image

from cellmorph.errors import CellmorphError
from cellmorph.data.preprocess import read_image, resize_uint8, to_uint8
from cellmorph.data.store import build_store


def test_store_real_subset(subset_table, tmp_path):
    store = build_store(subset_table, image_size=0, cache=tmp_path)
    assert store.images.shape == (660, 3, 256, 256) and store.images.dtype == np.uint8
    ref = np.asarray(Image.open(subset_table.df.Image_Path_RGB.iloc[5])).transpose(2, 0, 1)
    assert np.array_equal(store.images[5], ref)
    again = build_store(subset_table, image_size=0, cache=tmp_path)  # from the cache
    assert again.key == store.key and np.array_equal(again.images, store.images)
    assert list(again.index.Metadata_Compound) == list(subset_table.df.Metadata_Compound)


def test_truncated_image_names_file(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 100).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good.read_bytes()[:60])
    with pytest.raises(CellmorphError, match="bad.png: cannot decode"):
        read_image(bad)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff at all")
    with pytest.raises(CellmorphError, match="junk.tif"):
        read_image(junk)


def test_to_uint8_and_resize():
    a = np.linspace(0, 65535, 100 * 100).reshape(100, 100, 1).astype(np.uint16)
    u = to_uint8(a)
    assert u.dtype == np.uint8 and u.min() == 0 and u.max() == 255
    r = resize_uint8(np.full((100, 80, 2), 7, np.uint8), 32)
    assert r.shape == (32, 32, 2) and (r == 7).all()
