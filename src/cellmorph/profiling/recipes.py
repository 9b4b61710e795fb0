"""Profile recipes: how per-well profiles are prepared and compared. `Recipe` and its presets
(the Cell Painting default; the cytominer gallery's recipe for the Ljosa et al. table), pycytominer
normalisation (robust z-score or z-score per plate to the control wells), pycytominer feature selection,
cytominer's replicate correlation and optional sphering (pycytominer's ZCA-cor), all in `prepare_profiles`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.profiling.tables import COMPOUND, CONCENTRATION, is_control, is_metadata

# A feature whose MAD over the reference wells is 0 (e.g. CellProfiler's EulerNumber, Children counts) has
# no robust z-score: pycytominer's default epsilon 1e-18 turns it into values of ~1e16 that swamp every
# cosine similarity. With epsilon 0 it becomes inf, then NaN, and is dropped like any undefined feature
# (as the JUMP profiling recipe does).
MAD_EPSILON = 0.0
FEATURE_SELECTION = ["variance_threshold", "correlation_threshold", "drop_na_columns", "blocklist"]

SNF_K, SNF_MU, SNF_T = 20, 0.5, 20  # the cytominer gallery's SNFtool settings (affinityMatrix K, sigma; SNF K, t)


@dataclass
class Recipe:
    """How profiles are prepared and compared (every normalisation and selection step is pycytominer's).

    The default is the Cell Painting recipe: robust z-score per plate to DMSO, then feature selection,
    median treatment profiles, cosine similarity. `Recipe.preset("cytominer-gallery")` (and
    `"cytominer-gallery-snf"`) is the published recipe of the cytominer gallery for the Ljosa et al.
    table (docs/profiles.md): selection on the raw wells (variance, replicate correlation >= 0.5,
    correlation 0.95), z-score per plate to DMSO, mean treatment profiles, Pearson correlation
    (then similarity network fusion).

    >>> Recipe.preset("cytominer-gallery-snf").name()
    'cytominer-gallery-snf'
    """

    normalize: str = "mad_robustize"  # "mad_robustize", "standardize" or "none"
    feature_select: bool = True
    sphere: bool = False  # ZCA-cor fitted on the control wells (all wells without controls)
    control: str = "DMSO"
    select_first: bool = False  # select features on the raw wells, before normalising (the gallery's order)
    replicate_correlation: float | None = None  # drop features whose median replicate Pearson r is below this
    replicates: int = 3  # ... computed over the treatments with exactly this many wells
    correlation_threshold: float = 0.9
    aggregate: str = "median"  # wells -> treatment profile: "median" or "mean"
    similarity: str = "cosine"  # "cosine" or "pearson"
    snf: bool = False  # similarity network fusion of the similarity (SNFtool's algorithm; K=20, sigma=0.5, t=20)
    snf_update: str = "2.2"  # SNFtool <= 2.2's update (what the gallery ran) or "2.3" (SNFtool >= 2.2.1)
    preset_name: str = ""  # the preset this recipe came from (Recipe.preset), "" for a hand-made one

    @classmethod
    def preset(cls, name: str, **overrides) -> "Recipe":
        if name not in PRESETS:
            raise CellmorphError(f"unknown profile recipe {name!r}: choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides, "preset_name": name})

    def selection_steps(self) -> list[str]:
        if not self.feature_select:
            return []
        if self.select_first:
            return ["variance_threshold"] + ([f"replicate_correlation >= {self.replicate_correlation}"] if self.replicate_correlation is not None else []) + [
                f"correlation_threshold {self.correlation_threshold}", "drop_na_columns (after normalising)"]
        return [op if op != "correlation_threshold" else f"correlation_threshold {self.correlation_threshold}" for op in FEATURE_SELECTION]

    def describe(self) -> str:
        how = {"mad_robustize": "robust z-score (pycytominer mad_robustize)", "standardize": "z-score (pycytominer standardize)"}
        steps = [f"{how[self.normalize]} per plate to its {self.control} wells" if self.normalize in how else "no normalisation"]
        if self.feature_select:
            steps.append(("feature selection on the raw wells before normalising: " if self.select_first else "pycytominer feature_select (")
                         + ", ".join(self.selection_steps()) + ("" if self.select_first else ")"))
        if self.sphere:
            steps.append(f"sphering (pycytominer spherize, ZCA-cor, epsilon 1e-6) fitted on the {self.control} wells")
        steps.append(f"treatment profile = {self.aggregate} of its wells")
        steps.append(f"{'Pearson correlation' if self.similarity == 'pearson' else 'cosine similarity'}"
                     + (f", fused by SNF (SNFtool {'<= 2.2' if self.snf_update == '2.2' else '>= 2.2.1'} update; K={SNF_K}, sigma={SNF_MU}, t={SNF_T})" if self.snf else ""))
        return "; ".join(steps)

    def name(self) -> str:
        if self.preset_name in PRESETS:
            base = Recipe(**PRESETS[self.preset_name], control=self.control, preset_name=self.preset_name)
            changed = [f"{k}={v}" for k, v in vars(self).items() if v != getattr(base, k)]
            if self.preset_name != "default":
                return self.preset_name + (f"({', '.join(changed)})" if changed else "")
        parts = [{"mad_robustize": "robustize", "standardize": "standardize"}.get(self.normalize, "raw")] + (["featsel"] if self.feature_select else []) + (["sphere"] if self.sphere else [])
        return "+".join(parts)


PRESETS: dict[str, dict] = {
    "default": {},
    "cytominer-gallery": dict(normalize="standardize", select_first=True, replicate_correlation=0.5, correlation_threshold=0.95, aggregate="mean", similarity="pearson"),
    "cytominer-gallery-snf": dict(normalize="standardize", select_first=True, replicate_correlation=0.5, correlation_threshold=0.95, aggregate="mean", similarity="pearson", snf=True),
}


def replicate_correlation(wells: pd.DataFrame, features: list[str], strata: list[str], replicates: int = 3) -> tuple[pd.Series, int]:
    """Per feature, how well replicate wells agree: cytominer's `replicate_correlation`, which pycytominer
    does not have. Over the treatments (groups of `strata`) with exactly `replicates` wells, replicate k
    being a treatment's k-th well in table order, the Pearson correlation across treatments between each
    pair of replicates; the feature's value is the median over the pairs (NaN for a constant feature).
    Returns (the values, the number of treatments used).

    >>> r, n = replicate_correlation(wells, feats, ["Metadata_Compound", "Metadata_Concentration"])
    >>> kept = r.index[~(r < 0.5)]
    """
    from itertools import combinations

    size = wells.groupby(strata, sort=False, dropna=False)[features[0]].transform("size")
    w = wells[size == replicates]
    if w.empty:
        raise CellmorphError(f"replicate correlation needs treatments with exactly {replicates} wells (grouped by {', '.join(strata)}); the table has none. "
                             "Use a recipe without it (--recipe default), or Recipe(..., replicates=N) for N replicate wells per treatment.")
    w = w.assign(_replicate=w.groupby(strata, sort=False, dropna=False).cumcount()).sort_values(strata + ["_replicate"], kind="stable")
    values = w[features].to_numpy(dtype=np.float64).reshape(-1, replicates, len(features))  # treatments x replicates x features
    pairs = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for i, j in combinations(range(replicates), 2):
            x = values[:, i] - values[:, i].mean(axis=0)
            y = values[:, j] - values[:, j].mean(axis=0)
            pairs.append((x * y).sum(axis=0) / np.sqrt((x * x).sum(axis=0) * (y * y).sum(axis=0)))
    return pd.Series(np.median(np.stack(pairs), axis=0), index=features), int(values.shape[0])


def _select_on_raw_wells(df: pd.DataFrame, features: list[str], recipe: Recipe, info: dict) -> tuple[pd.DataFrame, list[str]]:
    """The cytominer gallery's selection, on the wells before normalisation: constant features, features
    whose replicates disagree (median replicate correlation below the threshold), then one feature of
    each group correlated above `recipe.correlation_threshold`."""
    from pycytominer import feature_select

    # min_variance 0: only constant features go (the gallery's caret-style variance filter removed none
    # here; pycytominer's default 1e-6 would drop raw features that merely have small units)
    df = feature_select(df, features=features, samples="all", operation="variance_threshold", min_variance=0)
    features = [f for f in features if f in df.columns]
    steps = {"variance_threshold": len(features)}
    if recipe.replicate_correlation is not None:
        strata = [COMPOUND] + ([CONCENTRATION] if CONCENTRATION in df.columns else [])
        r, n = replicate_correlation(df, features, strata, recipe.replicates)
        low = [f for f in features if r[f] < recipe.replicate_correlation]  # NaN is kept, as cytominer's filter(median < t) keeps it
        df = df.drop(columns=low)
        features = [f for f in features if f not in low]
        info["replicate_correlation"] = {"treatments": n, "replicates": recipe.replicates, "threshold": recipe.replicate_correlation,
                                         "dropped": len(low), "undefined": int(r.isna().sum()), "median_over_features": float(np.nanmedian(r.to_numpy()))}
        steps["replicate_correlation"] = len(features)
    df = feature_select(df, features=features, samples="all", operation="correlation_threshold", corr_threshold=recipe.correlation_threshold)
    features = [f for f in features if f in df.columns]
    steps["correlation_threshold"] = len(features)
    info["feature_selection"] = {"order": "before normalising", "operations": recipe.selection_steps(), "features_after": steps}
    return df, features


def _normalise(df: pd.DataFrame, features: list[str], recipe: Recipe, n_control: int) -> tuple[pd.DataFrame, str, list[str]]:
    """Per plate to the plate's control wells (a plate without controls, or a table without any: to all
    wells). Returns (wells, what was done, features with no z-score: zero spread in some reference)."""
    from pycytominer import normalize

    method = recipe.normalize
    if method == "none":
        return df, "none", []
    label = {"mad_robustize": "robust z-score (mad_robustize)", "standardize": "z-score (standardize)"}[method]
    kw = {"mad_robustize_epsilon": MAD_EPSILON} if method == "mad_robustize" else {}
    meta = [c for c in df.columns if is_metadata(c)]
    degenerate: set[str] = set()

    def run(g: pd.DataFrame, use_controls: bool) -> pd.DataFrame:
        ref = g[g["Metadata__Control"]] if use_controls else g
        if method == "standardize":  # sklearn scales a zero-sd feature by 1 instead of leaving it undefined
            sd = ref[features].std(axis=0, ddof=0)
            degenerate.update(sd.index[~(sd > 0)])
        return normalize(g, features=features, meta_features=meta, samples="Metadata__Control == True" if use_controls else "all", method=method, **kw)

    if n_control == 0:
        return run(df, False), f"{label} to all {len(df)} wells: no {recipe.control} wells in the table", sorted(degenerate)
    plates = df.groupby("Metadata_Plate", sort=True) if "Metadata_Plate" in df.columns else [("all", df)]
    parts, fallback = [], []
    for plate, g in plates:
        has = bool(g["Metadata__Control"].any())
        if not has:
            fallback.append(str(plate))
        parts.append(run(g, has))
    text = f"{label} per plate to its {recipe.control} wells ({n_control} {recipe.control} wells)"
    if fallback:
        text += f"; {len(fallback)} plate(s) without {recipe.control} to all their wells: {', '.join(fallback)}"
    return pd.concat(parts).loc[df.index], text, sorted(degenerate)


def prepare_profiles(wells: pd.DataFrame, features: list[str], recipe: Recipe) -> tuple[pd.DataFrame, list[str], dict]:
    """Normalise (per plate, to the plate's control wells; to all wells when the table has none), select
    features (after normalising, or before it in the cytominer-gallery order) and optionally sphere, all
    with pycytominer. Returns (wells, features kept, what was done)."""
    from pycytominer import feature_select, normalize

    info: dict = {"features_in": len(features)}
    df = wells.copy()
    df["Metadata__Control"] = is_control(df, recipe.control)
    n_control = int(df["Metadata__Control"].sum())
    # columns with no finite value carry nothing; drop them before anything divides by them
    finite = np.isfinite(df[features].to_numpy(dtype=np.float64))
    features = [f for f, ok in zip(features, finite.any(axis=0)) if ok]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if recipe.feature_select and recipe.select_first:
            df, features = _select_on_raw_wells(df, features, recipe, info)
        df, info["normalisation"], degenerate = _normalise(df, features, recipe, n_control)
        values = df[features].to_numpy(dtype=np.float64, copy=True)
        undefined = ~np.isfinite(values) | np.isin(np.array(features), degenerate)[None, :]
        if recipe.normalize != "none" and undefined.any(axis=0).any():
            # zero spread (MAD or sd) in the reference wells, e.g. a CNN channel that is 0 in most wells: no z-score
            n = int(undefined.any(axis=0).sum())
            spread = "MAD" if recipe.normalize == "mad_robustize" else "standard deviation"
            info["normalisation"] += f"; {n} of {len(features)} features have {spread} 0 in the reference wells somewhere (no z-score) and are dropped"
        values[undefined] = np.nan
        df[features] = values
        if recipe.feature_select and recipe.select_first:
            df = feature_select(df, features=features, samples="all", operation="drop_na_columns")
            features = [f for f in features if f in df.columns]
        elif recipe.feature_select:
            df = feature_select(df, features=features, samples="all", operation=FEATURE_SELECTION, corr_threshold=recipe.correlation_threshold)
            features = [f for f in features if f in df.columns]
            info["feature_selection"] = {"operations": FEATURE_SELECTION, "features_kept": len(features)}
        bad = [f for f in features if not np.isfinite(df[f].to_numpy(dtype=np.float64)).all()]
        if bad:  # a feature with NaN left in some wells: cosine similarity cannot use it
            features = [f for f in features if f not in bad]
            info["dropped_non_finite"] = len(bad)
        if not features:
            raise CellmorphError("no feature is left after normalisation and feature selection (every feature NaN, constant or blocklisted).")
        if recipe.sphere:
            fit_on = "Metadata__Control == True" if n_control else "all"
            df = normalize(df, features=features, meta_features=[c for c in df.columns if is_metadata(c)], samples=fit_on,
                           method="spherize", spherize_method="ZCA-cor", spherize_center=True, spherize_epsilon=1e-6)
            info["sphering"] = f"ZCA-cor (epsilon 1e-6) fitted on {n_control or len(df)} {'control' if n_control else ''} wells".replace("  ", " ")
    if recipe.select_first and "feature_selection" in info:
        info["feature_selection"]["features_kept"] = len(features)
    info["features_used"] = len(features)
    return df, features, info
