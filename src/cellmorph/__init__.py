"""cellmorph: classify cellular morphological changes in microscopy images by transfer learning.

The public API (each name's docstring has its arguments and an example):

    >>> import cellmorph as cm
    >>> table = cm.load_dataset("bbbc021-subset", data="~/data")
    >>> clf = cm.Classifier("tf_efficientnet_lite0", init="imagenet", mode="frozen", overrides={"frozen.C": 1.0})
    >>> res = cm.cross_validate(clf, table, protocol="loco")      # in memory: res.metrics, res.predictions
    >>> clf.fit(table).save("moa-model")                          # a self-contained bundle folder
    >>> cm.Classifier.load("moa-model").predict_proba(images)     # N x n_classes, columns = clf.classes
    >>> cm.run("configs/quickstart.toml", "runs/quickstart")      # the CLI's `cellmorph run` (final model in runs/quickstart/model)
    >>> cm.predict_images("runs/quickstart/model", "plate7/load_data.csv", "runs/plate7")  # `cellmorph predict`: sets, novelty

Names are imported on first use, so `import cellmorph` (and the CLI's start) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cellmorph.errors import CellmorphError

from cellmorph.version import __version__

# Public name -> the module that defines it.
_LAZY = {
    "Classifier": "cellmorph.api",
    "cross_validate": "cellmorph.api",
    "load_dataset": "cellmorph.api",
    "run": "cellmorph.api",
    "tune": "cellmorph.api",
    "CVResult": "cellmorph.engine.runner",
    "ExperimentConfig": "cellmorph.config",
    "load_config": "cellmorph.config",
    "ImageTable": "cellmorph.data.table",
    "Metrics": "cellmorph.evaluation.metrics",
    "predict_images": "cellmorph.prediction.predict",
}
__all__ = ["CellmorphError", "__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on first use
    from cellmorph.api import Classifier, cross_validate, load_dataset, run  # noqa: F401
    from cellmorph.config import ExperimentConfig, load_config  # noqa: F401
    from cellmorph.data.table import ImageTable  # noqa: F401
    from cellmorph.engine.runner import CVResult  # noqa: F401
    from cellmorph.evaluation.metrics import Metrics  # noqa: F401
    from cellmorph.prediction.predict import predict_images  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cellmorph' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
