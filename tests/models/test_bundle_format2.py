"""A bundle saved by cellmorph before the subpackage layout (format 2, commit dfcbb0e: a frozen timm
`test_efficientnet` with a random backbone, a logistic head on 3 classes and a calibration table) still loads
and predicts bit for bit what it predicted when it was saved."""

import json
from pathlib import Path

import numpy as np

import cellmorph as cm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def test_format2_bundle_from_before_the_move_predicts_identically():
    want = json.loads((FIXTURES / "bundle-format2-expected.json").read_text())
    x = np.random.default_rng(want["input_seed"]).integers(0, 256, want["input_shape"], dtype=np.uint8)
    clf = cm.Classifier.load(FIXTURES / "bundle-format2")
    assert clf.classes == want["classes"] and clf.channels == 3
    assert json.loads((FIXTURES / "bundle-format2" / "bundle.json").read_text())["format_version"] == 2
    got = clf.predict_proba(x)
    assert [[float(v).hex() for v in r] for r in got.astype(np.float64)] == want["probs_hex"]
    assert clf.calibration is not None and len(clf.calibration) == 3
