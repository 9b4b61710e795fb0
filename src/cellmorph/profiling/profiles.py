"""Image-based profiling: embeddings out of a run or a model bundle, and the field's profile metrics.

Two steps, each usable on its own:

    embed      per-image embeddings (the frozen backbone's cached features, or for a fine-tuned
               cross-validated run each fold model's pooled pre-logit features of the compound it held
               out), written as parquet with `Metadata_*` columns and `Image_CNN_<model>_NNNN` feature
               columns; then well profiles (median of a well's images) and treatment profiles (median
               of a treatment's wells), the paper's aggregation, done by `pycytominer.aggregate`.
    evaluate   any per-well profile table (cellmorph's, or CellProfiler's such as Ljosa et al. 2013):
               pycytominer normalisation (robust z-score, `mad_robustize`, per plate to its DMSO wells),
               pycytominer feature selection, optional sphering fitted on DMSO wells (pycytominer's
               ZCA-cor), then treatment profiles (median of wells) and, or the cytominer gallery's
               published recipe for the Ljosa table (`Recipe.preset("cytominer-gallery[-snf]")`:
               selection on raw wells incl. replicate correlation, z-score to DMSO, mean profiles,
               Pearson correlation, optionally similarity network fusion),
                 NSC / NSCB  1-nearest-neighbour MoA matching by cosine similarity, the neighbour drawn
                             from other compounds (NSC) or other compounds and other batches (NSCB)
                             (Ljosa et al. 2013; Ando et al. 2017). No maintained library computes
                             these, so they are the ~20 lines of `nearest_neighbour_matching`.
                 mAP         copairs' `average_precision` (positives: same MoA, other compound;
                             negatives: other MoA) and its per-MoA `mean_average_precision` with
                             permutation p-values.

Feature columns are named `Image_CNN_<model>_NNNN`: whole-field embeddings are image-level features,
so pycytominer infers them with `image_features=True` (its default `infer` looks for Cells_/Nuclei_/
Cytoplasm_ only); every pycytominer call here names the features explicitly.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.io import check_writable, write_json, write_parquet
from cellmorph.progress import console

EMBEDDINGS = "embeddings.parquet"
WELL_PROFILES = "profiles_well.parquet"
TREATMENT_PROFILES = "profiles_treatment.parquet"
METRICS = "profile_metrics.json"
PLOT = "profiles.png"
PROFILE_FILES = (EMBEDDINGS, WELL_PROFILES, TREATMENT_PROFILES, METRICS, PLOT)

COMPOUND, CONCENTRATION, MOA, BATCH = "Metadata_Compound", "Metadata_Concentration", "Metadata_MoA", "Metadata_Batch"
WELL_KEYS = ["Metadata_Plate", "Metadata_Well"]
# A feature whose MAD over the reference wells is 0 (e.g. CellProfiler's EulerNumber, Children counts) has
# no robust z-score: pycytominer's default epsilon 1e-18 turns it into values of ~1e16 that swamp every
# cosine similarity. With epsilon 0 it becomes inf, then NaN, and is dropped like any undefined feature
# (as the JUMP profiling recipe does).
MAD_EPSILON = 0.0
FEATURE_SELECTION = ["variance_threshold", "correlation_threshold", "drop_na_columns", "blocklist"]


def feature_prefix(model: str) -> str:
    return f"Image_CNN_{model}_"


def is_metadata(col: str) -> bool:
    """`Metadata_*` (pycytominer's convention) or CellProfiler's `Image_Metadata_*`."""
    return col.startswith("Metadata_") or "_Metadata_" in col


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns that are not metadata: the profile's features."""
    return [c for c in df.columns if not is_metadata(c) and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]


# --- embed ----------------------------------------------------------------------------------------


def embeddings_table(meta: pd.DataFrame, feats: np.ndarray, model: str) -> pd.DataFrame:
    """One row per image: its Metadata_* columns, then one float32 column per embedding dimension."""
    keep = meta[[c for c in meta.columns if c.startswith("Metadata_")]].reset_index(drop=True)
    names = [f"{feature_prefix(model)}{i:04d}" for i in range(feats.shape[1])]
    return pd.concat([keep, pd.DataFrame(np.asarray(feats, dtype=np.float32), columns=names)], axis=1)


def _constant_within(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Metadata columns with one value per group of `keys` (carried into the aggregated profile)."""
    meta = [c for c in df.columns if is_metadata(c) and c not in keys]
    if not meta:
        return []
    n = df.groupby(keys, dropna=False, observed=True)[meta].nunique(dropna=False).max()
    return [c for c in meta if n[c] <= 1]


def aggregate_profiles(df: pd.DataFrame, keys: list[str], features: list[str] | None = None, count: str | None = None) -> pd.DataFrame:
    """Median profile per group of `keys` by `pycytominer.aggregate`; metadata constant within a group
    is kept, `count` (e.g. "Metadata_Images") holds the rows per group.

    >>> wells = aggregate_profiles(embeddings, ["Metadata_Plate", "Metadata_Well"], count="Metadata_Images")"""
    from pycytominer import aggregate

    features = features or feature_columns(df)
    strata = keys + _constant_within(df, keys)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=FutureWarning)
        out = aggregate(df, strata=strata, features=features, operation="median")
    if count:
        sizes = df.groupby(strata, dropna=False, observed=True).size().rename(count).reset_index()
        out = out.merge(sizes, on=strata, how="left")
    meta = [c for c in out.columns if is_metadata(c)]
    return out[meta + features].sort_values(keys).reset_index(drop=True)


def well_and_treatment_profiles(emb: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Images -> wells (median per plate and well) -> treatments (median over the wells), as the paper
    aggregates predictions; only tables with plates, wells, compounds and concentrations have both."""
    need = WELL_KEYS + [COMPOUND, CONCENTRATION]
    missing = [c for c in need if c not in emb.columns]
    if missing:
        raise CellmorphError(f"embeddings lack the column(s) {missing}: wells and treatments cannot be formed (the dataset has no plate/well/compound/concentration metadata).")
    feats = feature_columns(emb)
    wells = aggregate_profiles(emb, WELL_KEYS, feats, count="Metadata_Images")
    treatments = aggregate_profiles(wells.drop(columns=["Metadata_Images"]), [COMPOUND, CONCENTRATION], feats, count="Metadata_Wells")
    return wells, treatments


@dataclass
class EmbedResult:
    embeddings: pd.DataFrame
    wells: pd.DataFrame | None
    treatments: pd.DataFrame | None
    out: Path
    how: str


def embed(source: str | Path, out: str | Path | None = None, data: str | Path | None = None) -> EmbedResult:
    """Per-image embeddings of a run folder or a model bundle, plus well and treatment profiles.

    Args:
        source: a run folder (`cellmorph run`) or a model bundle (`Classifier.save`).
        out: where to write embeddings.parquet, profiles_well.parquet and profiles_treatment.parquet;
            default: the run folder itself (a bundle needs `out`: a bundle folder holds only its own files).
        data: the folder holding the datasets (default $CELLMORPH_DATA).
    Returns:
        An `EmbedResult` (tables and the folder written).

    Example:
        >>> res = embed("runs/quickstart")
        >>> res.embeddings.shape, len(res.treatments)
        ((660, 1289), 55)
    """
    source = Path(source)
    if (source / "bundle.json").is_file():
        if out is None:
            raise CellmorphError(f"{source} is a model bundle: say where to write the embeddings with --out DIR (a bundle folder holds only its own files).")
        emb, how = _embed_bundle(source, data)
    elif (source / "config.toml").is_file() and (source / "dataset.json").is_file():
        emb, how = _embed_run(source, data)
    else:
        raise CellmorphError(f"{source}: neither a run folder (config.toml + dataset.json) nor a model bundle (bundle.json). Pass the folder `cellmorph run` or `Classifier.save` wrote.")
    out = Path(out) if out is not None else source
    check_writable(out)
    wells = treatments = None
    if set(WELL_KEYS + [COMPOUND, CONCENTRATION]) <= set(emb.columns):
        wells, treatments = well_and_treatment_profiles(emb)
    write_parquet(out / EMBEDDINGS, emb)
    if wells is not None:
        write_parquet(out / WELL_PROFILES, wells)
        write_parquet(out / TREATMENT_PROFILES, treatments)
    return EmbedResult(emb, wells, treatments, out, how)


def _embed_run(run: Path, data) -> tuple[pd.DataFrame, str]:
    from cellmorph.config import load_config
    from cellmorph.engine.runner import plan_run
    from cellmorph.data.store import build_store

    cfg = load_config(run / "config.toml")
    plan = plan_run(cfg, data)
    store = build_store(plan.table, cfg.dataset.image_size)
    old = json.loads((run / "dataset.json").read_text())
    if old.get("store_key") != store.key:
        raise CellmorphError(
            f"{run}: the run was computed from other data than the dataset found now ({old.get('rows')} rows then, {len(store.index)} now; "
            f"fingerprint {old.get('store_key')} vs {store.key}). Point --data at the data of that run, or run the config again."
        )
    if cfg.mode == "frozen":
        from cellmorph.models.features import cached_features, extract_features

        feats = cached_features(store, cfg.model, cfg.frozen.tta)
        if feats is None:
            feats = extract_features(store, cfg.model, cfg.frozen.tta, cfg.frozen.batch_size, plan.device)
        how = f"frozen {cfg.model.name} (init {cfg.model.init}) pooled features" + (" (8x dihedral TTA)" if cfg.frozen.tta else "") + "; the same for every fold (the backbone is never trained)"
        return embeddings_table(plan.table.df, feats, cfg.model.name), how
    return _embed_folds(run, cfg, plan, store), f"fine-tuned {cfg.model.name}: each image by the {cfg.evaluation.protocol} fold model that held it out (pooled pre-logit features)"


def _embed_folds(run: Path, cfg, plan, store) -> pd.DataFrame:
    """Fine-tuned run: each fold's held-out images through that fold's saved model (folds/NN/model.pt)."""
    import torch

    from cellmorph.models.factory import create_model
    from cellmorph.models.names import default_input_size
    from cellmorph.models.train import forward_batches, make_input_spec, resize_uint8_stack

    folder = run if len(cfg.seed_list) == 1 else run / "seeds" / str(cfg.seed_list[0])
    paths = [folder / "folds" / f"{i:02d}" / "model.pt" for i in range(len(plan.folds))]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise CellmorphError(
            f"{run}: no saved fold model {missing[0]} ({len(missing)} of {len(paths)} missing). Embedding a fine-tuned run needs every fold's model: "
            "rerun the config with --set finetune.save_models=true (into a new --out)."
        )
    size = cfg.model.input_size or default_input_size(cfg.model.name)
    images = resize_uint8_stack(torch.from_numpy(np.asarray(store.images)), size)
    device = plan.device
    parts = []
    for i, (fold, path) in enumerate(zip(plan.folds, paths)):
        info = json.loads((path.parent / "fold.json").read_text()) if (path.parent / "fold.json").is_file() else {}
        if info.get("held_out") not in (None, fold.name):
            raise CellmorphError(f"{path.parent}/fold.json holds out {info['held_out']!r} but the config's fold {i} is {fold.name!r}: the run does not match its config.")
        model = create_model(cfg.model.name, "random", num_classes=len(plan.classes), in_chans=images.shape[1], drop_rate=cfg.model.drop_rate)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        net = pre_logits(model, f"{cfg.model.name} ({path})")
        spec = make_input_spec(model, size, cfg.finetune.normalize, images[torch.from_numpy(fold.train)])
        feats = forward_batches(net, images[torch.from_numpy(fold.test)], spec, device, max(cfg.finetune.batch_size, 64)).numpy()
        meta = plan.table.df.iloc[fold.test].assign(Metadata_Fold=i, Metadata_Fold_HeldOut=str(fold.name))
        parts.append(embeddings_table(meta, feats, cfg.model.name))
        console.print(f"fold {i + 1}/{len(paths)} ({fold.name}): {len(fold.test)} images embedded")
    emb = pd.concat(parts, ignore_index=True)
    if "Metadata_ImageNumber" in emb.columns:
        emb = emb.sort_values("Metadata_ImageNumber").reset_index(drop=True)
    return emb


def pre_logits(model, what: str):
    """A module returning the pooled features a network's classifier reads (timm's `forward_head(...,
    pre_logits=True)`), or a clear error for a network without that interface."""
    from torch import nn

    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise CellmorphError(f"{what}: embeddings need a timm model (forward_features/forward_head); this architecture has none.")

    class _PreLogits(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.forward_head(self.net.forward_features(x), pre_logits=True)

    return _PreLogits(model)


def _embed_bundle(bundle: Path, data) -> tuple[pd.DataFrame, str]:
    from cellmorph.api import Classifier
    from cellmorph.data.catalog import load_dataset

    clf = Classifier.load(bundle)
    cfg = clf.config
    table = load_dataset(cfg.dataset.name, None if data is None else Path(data), label=cfg.dataset.label, **cfg.dataset.options)
    feats = clf.embed(table)
    return embeddings_table(table.df, feats, cfg.model.name), f"model bundle {bundle} ({cfg.mode} {cfg.model.name}): one model for every image"


# --- evaluate -------------------------------------------------------------------------------------


def read_profiles(path: str | Path) -> pd.DataFrame:
    """A profile table: parquet or CSV (.csv, .csv.gz), or a run folder (its profiles_well.parquet)."""
    path = Path(path)
    if path.is_dir():
        if (path / WELL_PROFILES).is_file():
            path = path / WELL_PROFILES
        else:
            raise CellmorphError(f"{path}: no {WELL_PROFILES} here. Write it first with `cellmorph embed {path}`, or pass a profile table (parquet or CSV).")
    if not path.is_file():
        raise CellmorphError(f"{path}: no such profile table. Pass a parquet or CSV file of per-well profiles, or a run folder after `cellmorph embed`.")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - any reader failure is the file's fault
        raise CellmorphError(f"{path}: cannot be read as a {'parquet' if path.suffix == '.parquet' else 'CSV'} table ({type(err).__name__}: {err}).") from None


def annotate_bbbc021(profiles: pd.DataFrame, metadata_dir: str | Path) -> pd.DataFrame:
    """Add Metadata_Plate/Well/Compound/Concentration/MoA/Batch to a BBBC021 per-well table keyed by
    CellProfiler's Image_Metadata_Plate and Image_Metadata_Well (e.g. the Ljosa et al. 2013 table), from
    BBBC021_v1_image.csv.gz (plate, well -> compound, concentration) and BBBC021_v1_moa.csv (-> MoA).
    Batch = the week of the plate's name (Week4_27481 -> Week4)."""
    d = Path(metadata_dir)
    image_csv = next((d / n for n in ("BBBC021_v1_image.csv.gz", "BBBC021_v1_image.csv") if (d / n).is_file()), None)
    moa_csv = d / "BBBC021_v1_moa.csv"
    if image_csv is None or not moa_csv.is_file():
        raise CellmorphError(f"--bbbc021-metadata {d}: expected BBBC021_v1_image.csv(.gz) and BBBC021_v1_moa.csv there (the Broad's BBBC021 metadata).")
    keys = {"Image_Metadata_Plate": "Metadata_Plate", "Image_Metadata_Well": "Metadata_Well"}
    missing = [k for k in keys if k not in profiles.columns and keys[k] not in profiles.columns]
    if missing:
        raise CellmorphError(f"the profile table lacks {missing}: --bbbc021-metadata annotates tables keyed by plate and well (Image_Metadata_Plate/Well or Metadata_Plate/Well).")
    prof = profiles.rename(columns={k: v for k, v in keys.items() if v not in profiles.columns})
    im = pd.read_csv(image_csv, usecols=["Image_Metadata_Plate_DAPI", "Image_Metadata_Well_DAPI", "Image_Metadata_Compound", "Image_Metadata_Concentration"])
    wells = im.drop_duplicates().rename(columns={"Image_Metadata_Plate_DAPI": "Metadata_Plate", "Image_Metadata_Well_DAPI": "Metadata_Well",
                                                 "Image_Metadata_Compound": COMPOUND, "Image_Metadata_Concentration": CONCENTRATION})
    moa = pd.read_csv(moa_csv).rename(columns={"compound": COMPOUND, "concentration": CONCENTRATION, "moa": MOA})
    prof = prof.drop(columns=[c for c in (COMPOUND, CONCENTRATION, MOA, BATCH) if c in prof.columns])
    out = prof.merge(wells, on=WELL_KEYS, how="left").merge(moa, on=[COMPOUND, CONCENTRATION], how="left").copy()
    unmatched = int(out[COMPOUND].isna().sum())
    if unmatched == len(out):
        raise CellmorphError(f"no plate/well of the profile table is in {image_csv}: is it a BBBC021 table?")
    out[BATCH] = out["Metadata_Plate"].astype(str).str.split("_").str[0]
    meta = [c for c in out.columns if is_metadata(c)]
    return out[meta + [c for c in out.columns if c not in meta]]


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
    preset: str = ""

    @classmethod
    def preset(cls, name: str, **overrides) -> "Recipe":
        if name not in PRESETS:
            raise CellmorphError(f"unknown profile recipe {name!r}: choose one of {', '.join(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides, "preset": name})

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
        if self.preset in PRESETS:
            base = Recipe(**PRESETS[self.preset], control=self.control, preset=self.preset)
            changed = [f"{k}={v}" for k, v in vars(self).items() if v != getattr(base, k)]
            if self.preset != "default":
                return self.preset + (f"({', '.join(changed)})" if changed else "")
        parts = [{"mad_robustize": "robustize", "standardize": "standardize"}.get(self.normalize, "raw")] + (["featsel"] if self.feature_select else []) + (["sphere"] if self.sphere else [])
        return "+".join(parts)


PRESETS: dict[str, dict] = {
    "default": {},
    "cytominer-gallery": dict(normalize="standardize", select_first=True, replicate_correlation=0.5, correlation_threshold=0.95, aggregate="mean", similarity="pearson"),
    "cytominer-gallery-snf": dict(normalize="standardize", select_first=True, replicate_correlation=0.5, correlation_threshold=0.95, aggregate="mean", similarity="pearson", snf=True),
}


@dataclass
class ProfileEvaluation:
    metrics: dict
    treatments: pd.DataFrame  # the processed treatment profiles compared (controls excluded)
    features: list[str] = field(default_factory=list)
    recipe: Recipe = field(default_factory=Recipe)


def _is_control(df: pd.DataFrame, control: str) -> pd.Series:
    c = pd.Series(False, index=df.index)
    for col in (COMPOUND, MOA):
        if col in df.columns:
            c |= df[col].astype(str) == control
    return c


def _labelled(values: pd.Series) -> pd.Series:
    return values.notna() & ~values.astype(str).str.strip().str.lower().isin(["", "nan", "none", "null"])


def check_profile_table(df: pd.DataFrame, source: str, control: str = "DMSO") -> list[str]:
    """The feature columns of a profile table, or a one-line error naming what is missing and the fix."""
    missing = [c for c in (COMPOUND, MOA) if c not in df.columns]
    if missing:
        raise CellmorphError(
            f"{source}: the profile table lacks {' and '.join(missing)}; NSC/NSCB and mAP compare MoAs across compounds. Add those columns, "
            "or for a BBBC021 table keyed by plate and well pass --bbbc021-metadata DIR (the folder of BBBC021_v1_image.csv.gz and BBBC021_v1_moa.csv)."
        )
    feats = feature_columns(df)
    if not feats:
        raise CellmorphError(f"{source}: no numeric feature columns (every column is Metadata_* or not a number).")
    values = df[feats].to_numpy(dtype=np.float64)
    if not np.isfinite(values).any():
        raise CellmorphError(f"{source}: every feature value is NaN or infinite ({len(feats)} feature columns, {len(df)} rows): nothing to compare. Check how the table was written.")
    lab = _labelled(df[MOA]) & ~_is_control(df, control)
    moas = df.loc[lab, MOA].astype(str).unique()
    if len(moas) < 2:
        raise CellmorphError(f"{source}: {len(moas)} MoA ({', '.join(moas) or 'none'}) among the non-{control} rows: MoA matching needs at least 2 MoAs (and 2 compounds of one MoA for a positive).")
    return feats


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
    df["Metadata__Control"] = _is_control(df, recipe.control)
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


def snf_affinity(dist: np.ndarray, K: int = SNF_K, mu: float = SNF_MU) -> np.ndarray:
    """SNFtool's `affinityMatrix(diff, K, sigma)`: a scaled exponential kernel of a distance matrix whose
    width for a pair is mu times the mean of (the two points' mean distance to their K nearest
    neighbours, twice, and their own distance) (Wang et al., Nat Methods 2014).

    >>> A = snf_affinity(1 - pearson_r)"""
    from scipy.stats import norm

    eps = np.finfo(np.float64).eps
    d = (dist + dist.T) / 2
    np.fill_diagonal(d, 0.0)
    means = np.sort(d, axis=1)[:, 1:K + 1].mean(axis=1) + eps
    sig = (means[:, None] + means[None, :]) / 3 + d / 3 + eps
    sig[sig <= eps] = eps
    dens = norm.pdf(d, loc=0.0, scale=mu * sig)
    return (dens + dens.T) / 2


def snf_fuse(*affinities: np.ndarray, K: int = SNF_K, t: int = SNF_T, update: str = "2.2") -> np.ndarray:
    """SNFtool's `SNF(Wall, K, t)`: each network diffused through the K-nearest-neighbour graphs of the
    others for t rounds, then averaged (Wang et al., Nat Methods 2014). Two lineages of the R code:

      update "2.2"  SNFtool <= 2.2 (and Wang's MATLAB, snfpy): rows normalised to sum 1 once, and after
                    each round the identity added (`Wall[[j]] = nextW[[j]] + diag(n)`). The cytominer
                    gallery's SNF result (rendered 2017-10-03) was computed with it.
      update "2.3"  SNFtool >= 2.2.1 (2017-11-24): after each round the rows renormalised with self-weight
                    1/2 (`normalize(X) = X / (2 (rowSums(X) - diag(X))); diag(X) <- 0.5`).

    Our numpy port of the R code: snfpy 0.2.2, the only Python port on PyPI, is unmaintained and fails
    with scikit-learn >= 1.8 (`check_array(force_all_finite=...)` was removed).

    >>> W = snf_fuse(A, A, K=20, t=20)"""
    if update not in ("2.2", "2.3"):
        raise CellmorphError(f"SNF update {update!r}: choose 2.2 (SNFtool <= 2.2) or 2.3 (SNFtool >= 2.2.1).")

    def symmetric(X):
        return (X + X.T) / 2

    def rows_to_one(X):
        return X / X.sum(axis=1, keepdims=True)

    def half_self(X):  # SNFtool >= 2.2.1's normalize
        off = X.sum(axis=1) - np.diag(X)
        off[off == 0] = 1.0
        X = X / (2 * off[:, None])
        np.fill_diagonal(X, 0.5)
        return X

    def dominate(X):  # .dominateset: keep each row's K largest entries, rows summing to 1
        A = np.zeros_like(X)
        top = np.argsort(X, axis=1, kind="stable")[:, -K:]
        np.put_along_axis(A, top, np.take_along_axis(X, top, axis=1), axis=1)
        return rows_to_one(A)

    if len(affinities) < 2:
        raise CellmorphError("SNF fuses at least two networks (the cytominer gallery fuses the affinity with itself).")
    normalise = rows_to_one if update == "2.2" else half_self
    W = [symmetric(normalise(np.asarray(a, dtype=np.float64))) for a in affinities]
    local = [dominate(w) for w in W]
    n = len(W)
    for _ in range(t):
        nxt = [local[j] @ (sum(W[k] for k in range(n) if k != j) / (n - 1)) @ local[j].T for j in range(n)]
        W = [symmetric(x + np.eye(len(x))) if update == "2.2" else symmetric(half_self(x)) for x in nxt]
    fused = normalise(sum(W) / n)
    return (fused + fused.T + np.eye(len(fused))) / 2


def unit_rows(X: np.ndarray, similarity: str = "cosine") -> np.ndarray:
    """Profiles scaled to unit length (centred first for Pearson), so that their dot products are the
    recipe's similarity; an all-zero profile stays zero."""
    X = np.asarray(X, dtype=np.float64)
    if similarity == "pearson":
        X = X - X.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norm > 0, norm, 1)


def similarity_matrix(X: np.ndarray, recipe: Recipe | None = None) -> tuple[np.ndarray, str]:
    """Treatment-by-treatment similarity: cosine, or Pearson correlation (cosine of the centred profiles),
    optionally fused by similarity network fusion as the cytominer gallery does (`snf_affinity(1 - r,
    K=20, mu=0.5)` fused with itself, `snf_fuse(A, A, K=20, t=20)`). Returns (the matrix, its description).

    >>> S, how = similarity_matrix(X, Recipe.preset("cytominer-gallery-snf"))
    """
    recipe = recipe or Recipe()
    U = unit_rows(X, recipe.similarity)
    S = U @ U.T
    how = "Pearson correlation" if recipe.similarity == "pearson" else "cosine similarity"
    if recipe.snf:
        k = min(SNF_K, len(X) - 1)
        if k < 2:
            raise CellmorphError(f"similarity network fusion needs at least 3 treatment profiles; there are {len(X)}.")
        A = snf_affinity(1.0 - S, K=k, mu=SNF_MU)
        S = snf_fuse(A, A, K=k, t=SNF_T, update=recipe.snf_update)
        version = "<= 2.2" if recipe.snf_update == "2.2" else ">= 2.2.1"
        how = f"{how} fused by SNF (SNFtool {version}: affinityMatrix(1 - r, K={k}, sigma={SNF_MU}), SNF(list(A, A), K={k}, t={SNF_T}); numpy port)"
    return S, how


def nearest_neighbour_matching(X: np.ndarray | None, moa, compound, batch=None, similarity: np.ndarray | None = None) -> dict:
    """NSC (or NSCB with `batch`): each profile's nearest neighbour by cosine similarity (or by the given
    `similarity` matrix) among the profiles of other compounds (and other batches), correct when it
    shares the MoA.

    A batch value may name several batches joined by "|" (a treatment whose wells span weeks): any
    shared batch excludes the neighbour. Queries left with no candidate are counted apart.

    >>> nearest_neighbour_matching(X, moa, compound)["correct"]"""
    S = similarity if similarity is not None else similarity_matrix(X)[0]
    moa, compound = np.asarray(moa).astype(str), np.asarray(compound).astype(str)
    allowed = compound[:, None] != compound[None, :]
    if batch is not None:
        sets = [set(str(b).split("|")) for b in batch]
        allowed &= np.array([[not (a & b) for b in sets] for a in sets])
    rows, correct, no_candidate = [], 0, 0
    for i in range(len(S)):
        cand = np.flatnonzero(allowed[i])
        if cand.size == 0:
            no_candidate += 1
            rows.append({"index": i, "neighbour": None, "similarity": None, "correct": None})
            continue
        j = int(cand[np.argmax(S[i, cand])])
        ok = bool(moa[j] == moa[i])
        correct += ok
        rows.append({"index": i, "neighbour": j, "similarity": float(S[i, j]), "correct": ok})
    total = len(S) - no_candidate
    ci = None
    if total:  # exact (Clopper-Pearson) 95% interval of the accuracy, as caret's confusionMatrix reports it
        from scipy.stats import binomtest

        lo, hi = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="exact")
        ci = [float(lo), float(hi)]
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None, "ci95": ci, "no_candidate": no_candidate, "queries": rows}


def map_copairs(meta: pd.DataFrame, X: np.ndarray, null_size: int = 10000, seed: int = 0, distance: str = "cosine",
                similarity: np.ndarray | None = None) -> dict:
    """mAP of MoA retrieval by copairs: per query, average precision of ranking the other compounds'
    profiles of its MoA (positives) above the other MoAs' (negatives) by cosine similarity (copairs'
    `distance`, e.g. "correlation"), or by a precomputed `similarity` matrix (e.g. SNF's), which copairs
    reads through a callable over row indices."""
    from importlib.metadata import version

    from copairs.map import average_precision, mean_average_precision

    m = meta[[MOA, COMPOUND]].astype(str).reset_index(drop=True)
    feats = np.asarray(X, dtype=np.float64)
    how = distance
    if similarity is not None:
        S = np.asarray(similarity, dtype=np.float64)
        feats = np.arange(len(S), dtype=np.float64)[:, None]
        distance = lambda x, y: S[x[:, 0].astype(np.int64), y[:, 0].astype(np.int64)]  # noqa: E731
        how = "a precomputed similarity matrix"
    try:
        ap = average_precision(m, feats, pos_sameby=[MOA], pos_diffby=[COMPOUND], neg_sameby=[], neg_diffby=[MOA],
                               distance=distance, progress_bar=False)
    except Exception as err:  # copairs raises UnpairedException (and others) when no pair can be formed
        raise CellmorphError(f"copairs could not form pairs for mAP ({type(err).__name__}: {err}): every MoA needs profiles of 2 compounds.") from None
    scored = ap[ap["n_pos_pairs"] > 0]
    per_moa = mean_average_precision(scored, sameby=[MOA], null_size=null_size, threshold=0.05, seed=seed, progress_bar=False)
    return {
        "mean": float(scored["average_precision"].mean()) if len(scored) else None,
        "queries": int(len(scored)),
        "queries_without_positive": int((ap["n_pos_pairs"] == 0).sum()),
        "per_query": [None if pd.isna(v) else float(v) for v in ap["average_precision"]],
        "n_pos_pairs": [int(v) for v in ap["n_pos_pairs"]],
        "per_moa": {r[MOA]: {"map": float(r["mean_average_precision"]), "p_value": float(r["p_value"]), "corrected_p_value": float(r["corrected_p_value"]),
                             "below_p": bool(r["below_corrected_p"])} for _, r in per_moa.iterrows()},
        "method": f"copairs {version('copairs')} copairs.map.average_precision ({how}; pos_sameby=[{MOA}], pos_diffby=[{COMPOUND}], "
                  f"neg_diffby=[{MOA}]); per-MoA copairs.map.mean_average_precision (null_size={null_size}, threshold 0.05, seed {seed})",
    }


def evaluate_profiles(profiles: pd.DataFrame, recipe: Recipe | None = None, source: str = "profiles", representation: str | None = None) -> ProfileEvaluation:
    """NSC, NSCB and copairs mAP of MoA retrieval over the treatment profiles of a per-well (or per-image)
    profile table, after the pycytominer recipe.

    Rows are first aggregated to wells (median per plate and well, when those columns exist), then
    normalised and selected (`prepare_profiles`), then aggregated to treatments (median of wells per
    compound and concentration; the mean in the cytominer-gallery recipe), then compared by the recipe's
    similarity. Control (DMSO) and unlabelled treatments are neither queries nor neighbours.

    Example:
        >>> ev = evaluate_profiles(pd.read_parquet("runs/quickstart/profiles_well.parquet"))
        >>> ev.metrics["nsc"]["correct"], ev.metrics["nsc"]["total"]
        (28, 55)
    """
    recipe = recipe or Recipe()
    feats = check_profile_table(profiles, source, recipe.control)
    df = profiles
    if set(WELL_KEYS) <= set(df.columns) and df.duplicated(WELL_KEYS).any():
        df = aggregate_profiles(df, WELL_KEYS, feats, count="Metadata_Images")
    wells, used, info = prepare_profiles(df, feats, recipe)
    tkeys = [COMPOUND] + ([CONCENTRATION] if CONCENTRATION in wells.columns else [])
    keep = _labelled(wells[MOA]) & ~wells["Metadata__Control"].astype(bool)
    scored_wells = wells[keep].drop(columns=["Metadata__Control"]).copy()
    # MoA and batch per treatment (a treatment's wells may span batches: all of them, joined by "|")
    groups = scored_wells.groupby(tkeys, sort=True, dropna=False)
    moa_n = groups[MOA].nunique()
    if (moa_n > 1).any():
        bad = moa_n[moa_n > 1].index[0]
        raise CellmorphError(f"{source}: treatment {bad} has wells of different MoAs; a treatment has one MoA.")
    meta = {MOA: groups[MOA].first(), "Metadata_Wells": groups.size()}
    has_batch = BATCH in scored_wells.columns
    if has_batch:
        meta[BATCH] = groups[BATCH].agg(lambda s: "|".join(sorted(set(map(str, s)))))
    profiles_of = groups[used].mean() if recipe.aggregate == "mean" else groups[used].median()
    treat = pd.concat([pd.DataFrame(meta), profiles_of], axis=1).reset_index()
    X = treat[used].to_numpy(dtype=np.float64)
    S, sim = similarity_matrix(X, recipe)
    nsc = nearest_neighbour_matching(None, treat[MOA], treat[COMPOUND], similarity=S)
    nscb = nearest_neighbour_matching(None, treat[MOA], treat[COMPOUND], treat[BATCH], similarity=S) if has_batch else None
    mp = map_copairs(treat, X, similarity=S) if recipe.snf else map_copairs(treat, X, distance="correlation" if recipe.similarity == "pearson" else "cosine")
    label = lambda i: None if i is None else {k: (v.item() if hasattr(v, "item") else v) for k, v in treat.loc[i, tkeys + [MOA]].items()}  # noqa: E731
    for res in (nsc, nscb):
        if res is not None:
            res["per_query"] = [{"treatment": label(q["index"]), "neighbour": label(q["neighbour"]), "similarity": q["similarity"], "correct": q["correct"]} for q in res.pop("queries")]
    mp["per_query"] = [{"treatment": label(i), "average_precision": ap, "n_pos_pairs": n}
                       for i, (ap, n) in enumerate(zip(mp.pop("per_query"), mp.pop("n_pos_pairs")))]
    metrics = {
        "representation": representation or source,
        "source": source,
        "recipe": "; ".join([info["normalisation"]] + recipe.describe().split("; ")[1:]),
        "recipe_name": recipe.name(),
        "counts": {"wells": int(len(wells)), "control_wells": int(wells["Metadata__Control"].sum()), "treatments": int(len(treat)),
                   "compounds": int(treat[COMPOUND].nunique()), "moas": int(treat[MOA].nunique()),
                   "batches": int(scored_wells[BATCH].nunique()) if has_batch else None},
        "preparation": info,
        "similarity": sim,
        "nsc": {"protocol": f"1-NN by {sim} among treatment profiles of other compounds (Ljosa et al. 2013)", **nsc},
        "nscb": ({"protocol": f"1-NN by {sim} among treatment profiles of other compounds and other batches ({BATCH})", **nscb} if nscb is not None
                 else {"protocol": f"not computed: the table has no {BATCH} column", "correct": None, "total": None, "accuracy": None}),
        "map": {"protocol": "copairs mAP of MoA retrieval among treatment profiles: positives same MoA and other compound, negatives other MoA", **mp},
    }
    return ProfileEvaluation(metrics, treat, used, recipe)


def plot_profiles(path: Path, ev: ProfileEvaluation, title: str) -> None:
    """PCA of the treatment profiles compared, one colour per MoA (sklearn PCA: no UMAP dependency)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    from cellmorph.io import atomic_path

    t, m = ev.treatments, ev.metrics
    X = unit_rows(t[ev.features].to_numpy(dtype=np.float64), ev.recipe.similarity)  # the geometry the metrics use
    pca = PCA(n_components=2, random_state=0).fit(X)
    xy = pca.transform(X)
    moas = sorted(t[MOA].astype(str).unique())
    cmap = plt.get_cmap("tab20" if len(moas) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(8.5, 6), constrained_layout=True)
    for k, moa in enumerate(moas):
        sel = (t[MOA].astype(str) == moa).to_numpy()
        ax.scatter(xy[sel, 0], xy[sel, 1], s=28, color=cmap(k % cmap.N), label=f"{moa} ({sel.sum()})", edgecolors="none")
    ev_ratio = pca.explained_variance_ratio_
    ax.set_xlabel(f"PC1 ({ev_ratio[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({ev_ratio[1]:.0%} of variance)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), title="MoA (treatments)", title_fontsize=8)
    nsc, nscb, mp = m["nsc"], m["nscb"], m["map"]
    line = f"NSC {nsc['correct']}/{nsc['total']}" + (f", NSCB {nscb['correct']}/{nscb['total']}" if nscb.get("total") is not None else "") + (
        f", mAP {mp['mean']:.3f} ({mp['queries']} queries)" if mp.get("mean") is not None else "")
    ax.set_title(f"{title}\n{m['counts']['treatments']} treatment profiles, {m['counts']['moas']} MoAs; {m['recipe_name']}\n{line}", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def evaluate(profiles: str | Path, out: str | Path | None = None, recipe: Recipe | None = None, bbbc021_metadata: str | Path | None = None,
             representation: str | None = None) -> ProfileEvaluation:
    """Evaluate a profile table and write profile_metrics.json and profiles.png.

    Args:
        profiles: a per-well (or per-image) profile table, parquet or CSV, or a run folder after `embed`.
        out: the folder for the results; default: the run folder when `profiles` is one (or lies in one),
            where report.html is written again to show them.
        recipe: normalisation, feature selection and sphering (default: robust z-score per plate to DMSO,
            pycytominer feature selection, no sphering).
        bbbc021_metadata: the folder of BBBC021_v1_image.csv.gz and BBBC021_v1_moa.csv, to annotate a
            CellProfiler table keyed by plate and well (e.g. Ljosa et al.'s per-well means).
        representation: a name for the profiles in the results (default: the file's name).
    Returns:
        A `ProfileEvaluation`; `metrics` is what profile_metrics.json holds.

    Example:
        >>> ev = evaluate("ljosa_jbiomolscreen_2013_per_well_mean.csv.gz", "runs/ljosa", bbbc021_metadata="bbbc021-metadata")
        >>> ev.metrics["nsc"]["total"], ev.metrics["counts"]["moas"]
        (103, 12)
    """
    path = Path(profiles)
    run = path if path.is_dir() else path.parent
    is_run = (run / "config.toml").is_file() and (run / "dataset.json").is_file()
    if out is None and not is_run:
        raise CellmorphError(f"{path} is not in a run folder: say where to write profile_metrics.json with --out DIR.")
    df = read_profiles(path)
    if bbbc021_metadata is not None:
        df = annotate_bbbc021(df, bbbc021_metadata)
    out = Path(out) if out is not None else run
    ev = evaluate_profiles(df, recipe, source=str(path), representation=representation or (f"{run.name} embeddings" if is_run and path.is_dir() else path.name))
    check_writable(out)  # only once the evaluation succeeded: a bad table leaves no folder behind
    plot_profiles(out / PLOT, ev, ev.metrics["representation"])
    write_json(out / METRICS, ev.metrics)
    if is_run and out.resolve() == run.resolve() and (run / "metrics.json").is_file():
        refresh_report(run)
    return ev


def refresh_report(run: Path) -> None:
    """Write the run's report.html again so that it shows the profile plot and metrics beside the scores."""
    from cellmorph.config import load_config
    from cellmorph.evaluation.metrics import Metrics
    from cellmorph.reporting.report import write_report

    write_report(run / "report.html", Metrics.read(run / "metrics.json"), load_config(run / "config.toml"))


def summary_line(m: dict) -> str:
    """One line: NSC, NSCB and mAP with their counts."""
    nsc, nscb, mp = m["nsc"], m["nscb"], m["map"]
    pct = lambda r: "–" if r.get("accuracy") is None else f"{r['accuracy']:.1%} ({r['correct']}/{r['total']}" + (  # noqa: E731
        f"; 95% CI {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})" if r.get("ci95") else ")")
    mean = "–" if mp.get("mean") is None else f"{mp['mean']:.3f} over {mp['queries']} queries"
    c = m["counts"]
    return f"{m['representation']} [{m['recipe_name']}]: NSC {pct(nsc)}, NSCB {pct(nscb)}, mAP {mean}; {c['treatments']} treatments, {c['moas']} MoAs, {c['compounds']} compounds"
