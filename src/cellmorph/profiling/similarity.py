"""Comparing treatment profiles: cosine or Pearson similarity, optionally fused by similarity network fusion
(a numpy port of SNFtool), and the retrieval metrics of image-based profiling:

    NSC / NSCB  1-nearest-neighbour MoA matching by cosine similarity, the neighbour drawn from other
                compounds (NSC) or other compounds and other batches (NSCB) (Ljosa et al. 2013; Ando et al.
                2017). No maintained library computes these, so they are the ~20 lines of
                `nearest_neighbour_matching`.
    mAP         copairs' `average_precision` (positives: same MoA, other compound; negatives: other MoA) and
                its per-MoA `mean_average_precision` with permutation p-values.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.profiling.recipes import SNF_K, SNF_MU, SNF_T, Recipe
from cellmorph.profiling.tables import COMPOUND, MOA


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
