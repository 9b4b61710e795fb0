"""frozen.features = "stages" (issue 23, item 1's pooled features from several backbone stages): the frozen
feature vector of real BBBC021 fields is every stage's global average followed by the usual pooled features, one
pass; a Classifier fitted on it saves and loads a bundle that predicts the same probabilities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cellmorph as cm
from cellmorph.data.store import build_store
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError
from cellmorph.models.backbone import StagePooled, frozen_width
from cellmorph.models.factory import create_model
from cellmorph.models.lenet import LeNet


@pytest.mark.realdata
def test_stage_features_are_stage_means_then_the_pooled_features(subset_table, tmp_path):
    df = subset_table.df
    rows = df.groupby("Metadata_MoA").head(4)
    table = ImageTable(rows, name="bbbc021-subset", label=subset_table.label, source=subset_table.source)
    common = {"frozen.C": 1.0, "model.input_size": 64}
    staged = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides=common | {"frozen.features": "stages"}).fit(table)
    last = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides=common).fit(table)
    images = build_store(table, 0).images
    f_staged, f_last = staged.embed(images), last.embed(images)
    net = create_model("tf_efficientnet_lite0", "imagenet", num_classes=0)
    assert f_staged.shape == (24, frozen_width(net, True)) == (24, 1280 + 16 + 24 + 40 + 112 + 320)
    assert f_last.shape == (24, 1280)
    np.testing.assert_allclose(f_staged[:, -1280:], f_last, rtol=1e-4, atol=1e-4)  # the tail is the usual feature vector
    assert np.abs(f_staged[:, :512]).sum(axis=1).min() > 0  # the stage means are there, not padding

    bundle = staged.save(tmp_path / "staged")
    again = cm.Classifier.load(bundle)
    assert again.config.frozen.features == "stages"
    np.testing.assert_allclose(again.predict_proba(images), staged.predict_proba(images), rtol=1e-5, atol=1e-6)


@pytest.mark.realdata
def test_auto_features_head_reads_the_chosen_columns_and_round_trips(subset_table, tmp_path):
    """frozen.features = "auto": the head is fitted on the columns the inner split chose and laid out over the whole
    stage-pooled vector (unread columns: coefficient 0); the saved bundle predicts the same probabilities."""
    rows = subset_table.df.groupby("Metadata_MoA").head(6)
    table = ImageTable(rows, name="bbbc021-subset", label=subset_table.label, source=subset_table.source)
    clf = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen",
                        overrides={"frozen.C": 1.0, "frozen.features": "auto", "model.input_size": 64}).fit(table)
    head = {k: v.numpy() for k, v in clf._head.items()}
    assert head["coef"].shape == (6, 1792) and head["mean"].shape == (1792,)
    stages_read = np.abs(head["coef"][:, :512]).sum() > 0
    if not stages_read:  # "last" chosen: the stage columns are laid out as unread (mean 0, scale 1, coefficient 0)
        assert (head["mean"][:512] == 0).all() and (head["scale"][:512] == 1).all()
    assert np.abs(head["coef"][:, 512:]).sum() > 0  # the last-layer part is read either way
    images = build_store(table, 0).images
    again = cm.Classifier.load(clf.save(tmp_path / "auto"))
    np.testing.assert_allclose(again.predict_proba(images), clf.predict_proba(images), rtol=1e-5, atol=1e-6)


def test_stage_features_need_a_network_with_stages():
    with pytest.raises(CellmorphError, match='frozen.features = "last"'):
        StagePooled(LeNet(num_classes=0))
    x = torch.rand(2, 3, 64, 64)
    out = StagePooled(create_model("tf_efficientnet_lite0", "random", num_classes=0)).eval()(x)
    assert out.shape == (2, 1792)
