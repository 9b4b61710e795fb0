"""Evaluating a per-well (or per-image) profile table, cellmorph's or CellProfiler's (e.g. Ljosa et al. 2013):
the recipe (`prepare_profiles`), treatment profiles, NSC, NSCB and copairs mAP of MoA retrieval; written
as profile_metrics.json and a PCA plot (profiles.png), and shown in a run folder's report.html.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellmorph.data.table import labelled_values
from cellmorph.errors import CellmorphError
from cellmorph.io import write_json
from cellmorph.profiling.recipes import Recipe, prepare_profiles
from cellmorph.profiling.similarity import map_copairs, nearest_neighbour_matching, similarity_matrix, unit_rows
from cellmorph.profiling.tables import (
    BATCH, COMPOUND, CONCENTRATION, METRICS, MOA, PLOT, WELL_KEYS, aggregate_profiles, annotate_bbbc021, check_profile_table, read_profiles,
)
from cellmorph.storage import EMBEDDINGS as EMBEDDINGS_FOLDER
from cellmorph.storage import RUN, writing


@dataclass
class ProfileEvaluation:
    metrics: dict
    treatments: pd.DataFrame  # the processed treatment profiles compared (controls excluded)
    features: list[str] = field(default_factory=list)
    recipe: Recipe = field(default_factory=Recipe)


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
        df = aggregate_profiles(df, "well", feats, count="Metadata_Images")
    wells, used, info = prepare_profiles(df, feats, recipe)
    tkeys = [COMPOUND] + ([CONCENTRATION] if CONCENTRATION in wells.columns else [])
    keep = labelled_values(wells[MOA]) & ~wells["Metadata__Control"].astype(bool)
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
    nscb_multi = multi_batch_nscb(treat, S) if has_batch else None
    mp = map_copairs(treat, X, similarity=S) if recipe.snf else map_copairs(treat, X, distance="correlation" if recipe.similarity == "pearson" else "cosine")
    label = lambda i: None if i is None else {k: (v.item() if hasattr(v, "item") else v) for k, v in treat.loc[i, tkeys + [MOA]].items()}  # noqa: E731
    for res in (nsc, nscb, nscb_multi):
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
        "nscb_multi_batch": nscb_multi or {"protocol": f"not computed: the table has no {BATCH} column", "correct": None, "total": None, "accuracy": None},
        "map": {"protocol": "copairs mAP of MoA retrieval among treatment profiles: positives same MoA and other compound, negatives other MoA", **mp},
    }
    return ProfileEvaluation(metrics, treat, used, recipe)


def multi_batch_nscb(treat: pd.DataFrame, S: np.ndarray) -> dict:
    """NSCB as published for BBBC021 (e.g. Ando et al. 2017 and the DeepProfiler bbbc021 evaluation): only the
    treatments of MoAs whose compounds lie in more than one batch, as queries and as neighbours. An MoA seen in
    one batch only (on BBBC021 Kinase inhibitors and Cholesterol-lowering, 11 of 103 treatments) has no correct
    neighbour in another batch, so its queries are wrong by construction in the count over all treatments.

    >>> multi_batch_nscb(treatments, S)["total"]   # 92 on Ljosa et al.'s BBBC021 table
    """
    batches: dict[str, set] = {}
    for moa, b in zip(treat[MOA].astype(str), treat[BATCH].astype(str)):
        batches.setdefault(moa, set()).update(b.split("|"))
    kept = sorted(m for m, s in batches.items() if len(s) > 1)
    dropped = sorted(set(batches) - set(kept))
    idx = np.flatnonzero(treat[MOA].astype(str).isin(kept).to_numpy())
    sub = treat.iloc[idx]
    res = nearest_neighbour_matching(None, sub[MOA], sub[COMPOUND], sub[BATCH], similarity=S[np.ix_(idx, idx)])
    for q in res["queries"]:  # back to the indices of `treat`
        q["index"] = int(idx[q["index"]])
        q["neighbour"] = None if q["neighbour"] is None else int(idx[q["neighbour"]])
    why = f"; dropped, seen in one batch only: {', '.join(dropped)} ({len(treat) - len(idx)} treatments)" if dropped else ""
    return {"protocol": f"NSCB as published for BBBC021: only the {len(idx)} of {len(treat)} treatments whose MoA has compounds in more than one "
                        f"batch ({BATCH}), as queries and as neighbours{why}", "moas_kept": kept, "moas_dropped": dropped, **res}


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
    multi = m.get("nscb_multi_batch") or {}
    line = f"NSC {nsc['correct']}/{nsc['total']}" + (f", NSCB {nscb['correct']}/{nscb['total']}" if nscb.get("total") is not None else "") + (
        f" ({multi['correct']}/{multi['total']} over MoAs in >1 batch)" if multi.get("total") is not None else "") + (
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
    into_run = is_run and out.resolve() == run.resolve()
    with writing(out, RUN if into_run else EMBEDDINGS_FOLDER):  # only once the evaluation succeeded: a bad table leaves no folder behind
        plot_profiles(out / PLOT, ev, ev.metrics["representation"])
        write_json(out / METRICS, ev.metrics)
        if into_run and (run / "metrics.json").is_file():
            refresh_report(run)
    return ev


def refresh_report(run: Path) -> None:
    """Write the run's report.html again so that it shows the profile plot and metrics beside the scores."""
    from cellmorph.config import load_config
    from cellmorph.evaluation.metrics import Metrics
    from cellmorph.reporting.report import write_report

    pred = pd.read_parquet(run / "predictions.parquet") if (run / "predictions.parquet").is_file() else None
    if pred is not None and "seed" in pred.columns:
        pred = pred[pred["seed"] == pred["seed"].iloc[0]]
    write_report(run / "report.html", Metrics.read(run / "metrics.json"), load_config(run / "config.toml"), pred)


def summary_line(m: dict) -> str:
    """One line: NSC, NSCB (over all treatments, and over the MoAs seen in more than one batch as published) and mAP with their counts."""
    nsc, nscb, mp = m["nsc"], m["nscb"], m["map"]
    pct = lambda r: "–" if r.get("accuracy") is None else f"{r['accuracy']:.1%} ({r['correct']}/{r['total']}" + (  # noqa: E731
        f"; 95% CI {r['ci95'][0]:.2f}-{r['ci95'][1]:.2f})" if r.get("ci95") else ")")
    mean = "–" if mp.get("mean") is None else f"{mp['mean']:.3f} over {mp['queries']} queries"
    c = m["counts"]
    multi = m.get("nscb_multi_batch") or {}
    published = f", NSCB over MoAs in >1 batch (as published) {pct(multi)}" if multi.get("total") is not None else ""
    return (f"{m['representation']} [{m['recipe_name']}]: NSC {pct(nsc)}, NSCB over all treatments {pct(nscb)}{published}, mAP {mean}; "
            f"{c['treatments']} treatments, {c['moas']} MoAs, {c['compounds']} compounds")
