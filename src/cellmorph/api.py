"""The public Python API (`import cellmorph as cm`): the CLI's verbs as functions, and the `Classifier`
(cellmorph.models.classifier) that trains on an ImageTable, predicts on arrays or tables, and saves to a
self-contained bundle. Every function goes through the same code as the CLI.
"""

from __future__ import annotations

from pathlib import Path

from cellmorph.config import ExperimentConfig, load_config, override
from cellmorph.data.catalog import load_dataset as _load_dataset
from cellmorph.data.table import ImageTable
from cellmorph.engine.runner import CVResult, cross_validate_config, run_experiment
from cellmorph.engine.tune import tune as _tune
from cellmorph.evaluation.metrics import Metrics
from cellmorph.models.classifier import Classifier

__all__ = ["Classifier", "cross_validate", "load_dataset", "run", "tune"]


def load_dataset(name: str, data: str | Path | None = None, label: str | None = None, **options) -> ImageTable:
    """Load a dataset's table of images (metadata and paths; no pixels decoded yet), labelled or not.

    Args:
        name: a dataset name (`cellmorph datasets` lists them), e.g. "bbbc021-subset", or "folder" for your own CSV.
        data: the folder holding the datasets; None means $CELLMORPH_DATA (not needed for an absolute csv path).
        label: the column to classify, which must then exist. None: the dataset's own (the folder dataset:
            Metadata_MoA when the CSV has it; a CSV without it loads unlabelled, `table.labelled` False: new images
            to predict with `Classifier.predict_proba(table)` or `predict_images(bundle, table)`).
        **options: the dataset's options, as `dataset.options` in a config (e.g. csv="plates.csv" for "folder").
    Returns:
        An `ImageTable`: one row per image, `Metadata_*` and `Image_Path_*` columns.

    Example:
        >>> table = load_dataset("bbbc021-subset", data="~/data")
        >>> len(table), table.classes[:2]
        (660, ['Aurora kinase inhibitors', 'Cholesterol-lowering'])
        >>> new = load_dataset("folder", csv="/lab/new_patches.csv")     # no label column: to predict
        >>> predict_images("runs/nuclei/model", new).images[["predicted", "probability"]]
    """
    return _load_dataset(name, None if data is None else Path(data).expanduser(), label=label, **options)


def run(config: str | Path | ExperimentConfig, out: str | Path, data: str | Path | None = None) -> Metrics:
    """Run an experiment into a run folder, exactly as `cellmorph run CONFIG --out OUT`.

    Args:
        config: a config file (TOML) or an `ExperimentConfig`.
        out: the run folder; rerunning with the same folder resumes at the first missing fold.
        data: the folder holding the datasets; None means $CELLMORPH_DATA.
    Returns:
        The run's `Metrics` (also in out/metrics.json).

    Example:
        >>> m = run("configs/quickstart.toml", "runs/quickstart")
        >>> m.level("treatment").correct, m.level("image").correct
        (55, 573)
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    return run_experiment(cfg, out, data)


def tune(config: str | Path | ExperimentConfig, out: str | Path, data: str | Path | None = None, budget_min: float = 45.0,
         candidates: list[str] | None = None) -> Metrics:
    """Choose a recipe by nested validation and score it once on the outer split, exactly as `cellmorph tune`.

    Args:
        config: a config file (TOML) or an `ExperimentConfig` with a single-split protocol (random, image-grouped,
            holdout-25); its dataset, label, split, seed and frozen network are kept.
        out: the tune folder: candidates/<name>/ (each scored on the inner split), final/ (the chosen recipe).
        data: the folder holding the datasets; None means $CELLMORPH_DATA.
        budget_min: minutes for the whole call; candidates start only within the first half.
        candidates: try only these (cellmorph.engine.tune.CANDIDATE_NAMES); None = all.
    Returns:
        The outer split's `Metrics`; `.context["tune"]` holds every candidate's inner scores and the choice.

    Example:
        >>> m = tune("configs/nuclei/auto-image-grouped.toml", "runs/nuclei-tune")
        >>> m.context["tune"]["chosen"], round(m.level("image").accuracy, 3)
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    return _tune(cfg, out, data, budget_min, candidates)


def cross_validate(clf: Classifier | ExperimentConfig, table: ImageTable | None = None, protocol: str | None = None, *,
                   data: str | Path | None = None, overrides: dict | None = None) -> CVResult:
    """Cross-validate a classifier's recipe in memory: the same folds, models and scores as `run`, nothing written.

    Args:
        clf: a `Classifier` (its config is used; it is not fitted) or an `ExperimentConfig`.
        table: the images; None loads the config's dataset from `data`.
        protocol: the fold protocol ("loco", "lcbo", "random", ...); None keeps the config's.
        data: the folder holding the datasets when `table` is None; None means $CELLMORPH_DATA.
        overrides: further {dotted.field: value} changes, e.g. {"evaluation.max_folds": 2}.
    Returns:
        A `CVResult`: `.metrics` (`Metrics`) and `.predictions` (one row per image: Metadata_*, fold, prob_<class>).

    Example:
        >>> res = cross_validate(Classifier("tf_efficientnet_lite0"), table, protocol="loco")
        >>> res.metrics.level("treatment").correct, res.metrics.level("treatment").total
        (55, 55)
    """
    cfg = clf.config if isinstance(clf, Classifier) else clf
    changes = {**({"evaluation.protocol": protocol} if protocol is not None else {}), **(overrides or {})}
    return cross_validate_config(override(cfg, changes) if changes else cfg, table=table, data_dir=data)


