"""The streaming data path: batches decoded ahead by threads equal the in-memory store bit for bit, and so do
the network's outputs; bounded work in flight; a mismatched field is named."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cellmorph.data.preprocess import load_field
from cellmorph.data.store import build_store, open_store
from cellmorph.data.stream import cut_patches, field_batches
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError


@pytest.fixture(scope="module")
def small(subset_table):
    """40 real subset fields (a new table, so a store of its own)."""
    return ImageTable(subset_table.df.iloc[:40].reset_index(drop=True), name="subset-40", label=subset_table.label, source="test")


def test_streamed_batches_equal_the_store_in_order(small, tmp_path):
    stored = build_store(small, 0, cache=tmp_path / "cache").images
    got = list(field_batches(small, 0, batch=7, workers=3, prefetch=2))
    assert [len(r) for r, _ in got] == [7] * 5 + [5]
    assert np.array_equal(np.concatenate([r for r, _ in got]), np.arange(40))
    assert np.array_equal(np.concatenate([b for _, b in got]), stored)
    rows = np.array([39, 3, 17])  # any rows, in the order asked
    (r, b), = field_batches(small, 0, rows=rows, batch=8)
    assert np.array_equal(r, rows) and np.array_equal(b, stored[rows])


def test_a_lazy_store_streams_without_caching_pixels(small, tmp_path):
    cache = tmp_path / "cache"
    store = open_store(small, 64, cache=cache)
    assert not store.decoded and store.shape == (40, 3, 64, 64)
    streamed = np.concatenate([b for _, b in store.batches(16)])
    assert not store.decoded and not list(cache.glob("store/*/images.npy"))  # nothing decoded into memory or the cache
    assert np.array_equal(streamed, store.images) and store.decoded  # `images` decodes all (and caches them)
    again = open_store(small, 64, cache=cache)  # a cached store is then read from disk, memory-mapped, batch by batch
    assert np.array_equal(np.concatenate([b for _, b in again.batches(16)]), streamed) and not again.decoded


def test_streamed_features_equal_in_memory_features(small):
    """The frozen path's features through the stream are the in-memory path's, bit for bit (same batches)."""
    from cellmorph.models.factory import create_model, normalization
    from cellmorph.models.features import stream_forward
    from cellmorph.models.train import InputSpec, forward_batches

    model = create_model("tf_efficientnet_lite0", "imagenet", num_classes=0, in_chans=3)
    mean, std = normalization(model)
    spec = InputSpec(size=64, mean=mean, std=std)
    table = ImageTable(small.df.iloc[:24], name="subset-24", label=small.label, source="test")
    whole = forward_batches(model, torch.from_numpy(build_store(table, 0).images), spec, torch.device("cpu"), 8)
    streamed = stream_forward(model, field_batches(table, 0, batch=8), spec, torch.device("cpu"), 24, "features")
    assert torch.equal(whole, streamed)


def test_patches_stream_as_cut_from_their_image(crchisto_table):
    t = crchisto_table
    table = ImageTable(t.df.iloc[:300].reset_index(drop=True), name="nuclei-300", label=t.label, source="test", patch_size=t.patch_size, required=())
    got = np.concatenate([b for _, b in field_batches(table, 0, batch=64)])
    df = table.df
    for i in (0, 150, 299):
        image = load_field(df.iloc[i][table.path_columns].astype(str).tolist(), 0)
        want = cut_patches(image, df["Metadata_Center_X"].to_numpy()[[i]], df["Metadata_Center_Y"].to_numpy()[[i]], t.patch_size)[0]
        assert np.array_equal(got[i], want)


def test_a_field_of_another_size_in_a_later_batch_is_named(tmp_path):
    paths = []
    for i in range(6):
        p = tmp_path / f"f{i}.png"
        Image.fromarray(np.full((20 if i < 5 else 24, 20), 10 * i, np.uint8)).save(p)
        paths.append(str(p))
    import pandas as pd

    table = ImageTable(pd.DataFrame({"Image_Path_DNA": paths, "Metadata_MoA": list("ababab")}), name="sizes", label="Metadata_MoA", source=str(tmp_path / "t.csv"), required=())
    with pytest.raises(CellmorphError, match=r"f5\.png: 24x20 pixels but row 4's .*f4\.png 20x20"):
        list(field_batches(table, 0, batch=2))
