"""Profiles: NSC/NSCB and copairs mAP on tables whose answers are known by construction, the embeddings
of the real subset through pycytominer, the Ljosa et al. CellProfiler table end to end, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellmorph.profiling.evaluate import evaluate_profiles
from cellmorph.profiling.recipes import Recipe
from cellmorph.profiling.similarity import map_copairs, nearest_neighbour_matching

REPO = Path(__file__).resolve().parents[2]

# Five treatments built so that the answers follow from the geometry:
#   q1 (a, X, W1) [1, 0, 0]        its nearest other compound is q2 (Y, same batch W1): NSC wrong;
#   q5 (a, X, W1) [1, 0, 0.01]     same compound as q1 (never its neighbour), same story;
#   q2 (b, Y, W1) [0.99, 0.1, 0]   nearest q1/q5 (X): wrong; among W2 only, q3 (X): wrong again;
#   q3 (c, X, W2) [0.9, 0.4, 0]    nearest q2 (Y): wrong under both;
#   q4 (d, Y, W2) [0, 1, 0]        nearest q3 (X): wrong; among W1 only q2 (Y): right.
TINY = pd.DataFrame({
    "Metadata_Compound": ["a", "b", "c", "d", "a"],
    "Metadata_MoA": ["X", "Y", "X", "Y", "X"],
    "Metadata_Batch": ["W1", "W1", "W2", "W2", "W1"],
})
TINY_X = np.array([[1, 0, 0], [0.99, 0.1, 0], [0.9, 0.4, 0], [0, 1, 0], [1, 0, 0.01]])


def test_nsc_excludes_same_compound_and_nscb_same_batch():
    t = TINY
    nsc = nearest_neighbour_matching(TINY_X, t["Metadata_MoA"], t["Metadata_Compound"])
    neighbours = [q["neighbour"] for q in nsc["queries"]]
    assert neighbours[0] == 1 and neighbours[4] == 1  # q1 and q5 never pick each other (same compound)
    assert [q["correct"] for q in nsc["queries"]] == [False] * 5
    assert (nsc["correct"], nsc["total"]) == (0, 5)
    nscb = nearest_neighbour_matching(TINY_X, t["Metadata_MoA"], t["Metadata_Compound"], t["Metadata_Batch"])
    assert [q["neighbour"] for q in nscb["queries"]] == [2, 2, 1, 1, 2]  # only the other batch may answer
    assert [q["correct"] for q in nscb["queries"]] == [True, False, False, True, True]
    assert (nscb["correct"], nscb["total"], nscb["no_candidate"]) == (3, 5, 0)


def test_published_nscb_drops_the_moas_seen_in_one_batch_as_queries_and_neighbours():
    from cellmorph.profiling.evaluate import multi_batch_nscb

    # TINY plus a sixth treatment e of MoA Z, seen only in batch W2, placed beside q1/q2/q5 (W1): over all
    # treatments it steals their other-batch neighbour and is itself a query with no right answer.
    t = pd.concat([TINY, pd.DataFrame({"Metadata_Compound": ["e"], "Metadata_MoA": ["Z"], "Metadata_Batch": ["W2"]})], ignore_index=True)
    X = np.vstack([TINY_X, [[0.99, 0.12, 0]]])
    U = X / np.linalg.norm(X, axis=1, keepdims=True)
    S = U @ U.T
    everything = nearest_neighbour_matching(None, t["Metadata_MoA"], t["Metadata_Compound"], t["Metadata_Batch"], similarity=S)
    assert everything["total"] == 6 and everything["queries"][5]["correct"] is False  # Z has no other-batch match: wrong by construction
    assert everything["queries"][0]["neighbour"] == 5  # q1's nearest other-batch profile is now the Z treatment
    published = multi_batch_nscb(t, S)
    assert published["moas_dropped"] == ["Z"] and published["moas_kept"] == ["X", "Y"] and published["total"] == 5
    assert [q["index"] for q in published["queries"]] == [0, 1, 2, 3, 4]  # indices of the whole table
    assert [q["neighbour"] for q in published["queries"]] == [2, 2, 1, 1, 2]  # as in TINY: Z is no neighbour either
    assert published["correct"] == 3 and "Z (1 treatments)" in published["protocol"]


def test_nsc_separated_moas_and_queries_without_candidates():
    rng = np.random.default_rng(0)
    centres = {"X": np.array([5.0, 0, 0, 0]), "Y": np.array([0, 5.0, 0, 0]), "Z": np.array([0, 0, 5.0, 0])}
    moa = ["X", "X", "Y", "Y", "Z", "Z"]
    X = np.stack([centres[m] + rng.normal(0, 0.1, 4) for m in moa])
    compound = ["x1", "x2", "y1", "y2", "z1", "z2"]
    res = nearest_neighbour_matching(X, moa, compound)
    assert (res["correct"], res["total"]) == (6, 6)
    # every treatment in its own batch except y1/y2 and z1/z2, which share theirs: those lose their positive
    res = nearest_neighbour_matching(X, moa, compound, ["b1", "b2", "b3", "b3", "b4", "b4"])
    assert (res["correct"], res["total"]) == (2, 6)
    # one batch for all: no query has a candidate left, none is counted
    res = nearest_neighbour_matching(X, moa, compound, ["b"] * 6)
    assert (res["total"], res["no_candidate"], res["accuracy"]) == (0, 6, None)


def test_map_copairs_matches_hand_computed_average_precision():
    m = map_copairs(TINY, TINY_X, null_size=200)
    ap = m["per_query"]
    # q1: ranked q2 (neg) 0.995, q3 (pos) 0.914, q4 (neg): AP = 1/2; q5 the same
    assert ap[0] == pytest.approx(0.5) and ap[4] == pytest.approx(0.5)
    # q3: ranked q2 (neg) 0.950, q1 (pos) 0.914, q5 (pos) 0.914, q4 (neg): AP = (1/2 + 2/3) / 2
    assert ap[2] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["n_pos_pairs"] == [1, 1, 2, 1, 1]  # same MoA, other compound: q5 is never q1's positive
    assert m["mean"] == pytest.approx(np.mean(ap)) and m["queries"] == 5
    assert "copairs 0.5.5" in m["method"]


def _write_well_table(path: Path, df: pd.DataFrame) -> Path:
    df.to_csv(path, index=False)
    return path


def _wells(n_feat: int = 6, moas=("X", "X", "Y", "Y"), seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for k, moa in enumerate(moas):
        for rep in range(2):
            rows.append({"Metadata_Plate": f"P{rep}", "Metadata_Well": f"A0{k}", "Metadata_Compound": f"c{k}", "Metadata_Concentration": 1.0,
                         "Metadata_MoA": moa, **{f"Cells_F{j}": rng.normal() for j in range(n_feat)}})
    return pd.DataFrame(rows)


def test_evaluate_profiles_small_table_counts():
    ev = evaluate_profiles(_wells(), Recipe(feature_select=False))
    m = ev.metrics
    assert m["counts"]["treatments"] == 4 and m["counts"]["moas"] == 2 and m["nsc"]["total"] == 4
    assert m["nscb"]["total"] is None  # no Metadata_Batch column: not computed, and said so
    assert len(m["map"]["per_query"]) == 4 and set(m) >= {"nsc", "nscb", "map"}


def test_replicate_correlation_by_hand():
    from cellmorph.profiling.recipes import replicate_correlation

    # 4 treatments x 3 replicate wells (replicate k = a treatment's k-th row); "good" repeats across
    # replicates up to a small shift, "bad" is reversed in replicate 2, so its 3 pairwise r are 1, -1, -1;
    # treatment t4 has only 2 wells and is left out, as cytominer leaves out groups of another size
    good = {"t0": [0, 0.1, 0], "t1": [1, 1.1, 1], "t2": [2, 2.1, 2], "t3": [3, 3.1, 3]}
    bad = {"t0": [0, 0, 3], "t1": [1, 1, 2], "t2": [2, 2, 1], "t3": [3, 3, 0]}
    rows = [{"Metadata_Compound": t, "Metadata_Concentration": 1.0, "Cells_good": good[t][k], "Cells_bad": bad[t][k]} for k in range(3) for t in good]
    rows += [{"Metadata_Compound": "t4", "Metadata_Concentration": 1.0, "Cells_good": 50.0, "Cells_bad": -50.0}] * 2
    df = pd.DataFrame(rows)
    r, n = replicate_correlation(df, ["Cells_good", "Cells_bad"], ["Metadata_Compound", "Metadata_Concentration"], 3)
    assert n == 4
    assert r["Cells_good"] == pytest.approx(1.0) and r["Cells_bad"] == pytest.approx(-1.0)


def test_snf_updates_fuse_two_clusters_and_differ():
    from cellmorph.profiling.similarity import snf_affinity, snf_fuse

    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (25, 8)) + 2, rng.normal(0, 1, (25, 8)) - 2])
    D = ((X[:, None] - X[None]) ** 2).sum(-1)
    A = snf_affinity(D, K=10)
    assert np.allclose(A, A.T) and (A > 0).all()
    fused = {u: snf_fuse(A, A, K=10, t=20, update=u) for u in ("2.2", "2.3")}
    for W in fused.values():
        assert np.allclose(W, W.T)
        within = np.r_[W[:25, :25][np.triu_indices(25, 1)], W[25:, 25:][np.triu_indices(25, 1)]].mean()
        assert within > 10 * W[:25, 25:].mean()  # the diffusion concentrates similarity inside each cluster
    assert not np.allclose(fused["2.2"], fused["2.3"])  # the two SNFtool lineages are different updates
    with pytest.raises(Exception, match="2.2"):
        snf_fuse(A, A, update="2.1")


def test_recipe_presets_and_names():
    g = Recipe.preset("cytominer-gallery-snf")
    assert (g.normalize, g.aggregate, g.similarity, g.snf, g.snf_update, g.replicate_correlation, g.correlation_threshold) == ("standardize", "mean", "pearson", True, "2.2", 0.5, 0.95)
    assert g.name() == "cytominer-gallery-snf" and Recipe.preset("default").name() == Recipe().name() == "robustize+featsel"
    assert Recipe.preset("cytominer-gallery-snf", snf_update="2.3").name() == "cytominer-gallery-snf(snf_update=2.3)"  # a changed preset says so
    with pytest.raises(Exception, match="cytominer-gallery"):
        Recipe.preset("nope")


def test_gallery_recipe_uses_means_and_pearson():
    wells = pd.concat([_wells(moas=("X", "X", "Y", "Y", "Z", "Z"), seed=s).assign(Metadata_Plate=f"P{s}") for s in range(3)], ignore_index=True)
    wells["Metadata_Well"] = [f"W{i}" for i in range(len(wells))]
    ev = evaluate_profiles(wells, Recipe.preset("cytominer-gallery", replicate_correlation=None))
    feats = ev.features
    # no controls: z-scored to all wells of the table (one group), then the treatment profile is the mean of its wells
    z = wells[feats].sub(wells[feats].mean()).div(wells[feats].std(ddof=0))
    expected = z.assign(c=wells["Metadata_Compound"]).groupby("c")[feats].mean()
    got = ev.treatments.set_index("Metadata_Compound")[feats]
    assert np.allclose(got.loc[expected.index].to_numpy(), expected.to_numpy())
    assert ev.metrics["similarity"] == "Pearson correlation" and "correlation" in ev.metrics["map"]["method"]
    snf = evaluate_profiles(wells, Recipe.preset("cytominer-gallery-snf", replicate_correlation=None))
    assert "SNF" in snf.metrics["similarity"] and "precomputed similarity" in snf.metrics["map"]["method"]
    assert snf.metrics["nsc"]["ci95"][0] <= snf.metrics["nsc"]["accuracy"] <= snf.metrics["nsc"]["ci95"][1]


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cellmorph", *args], capture_output=True, text=True, cwd=cwd, env={**os.environ})


@pytest.mark.parametrize("case", ["no_moa", "all_nan", "single_moa", "no_compound"])
def test_bad_profile_tables_exit_2_with_one_line(tmp_path, case):
    df = _wells()
    if case == "no_moa":
        df = df.drop(columns=["Metadata_MoA"])
    elif case == "no_compound":
        df = df.drop(columns=["Metadata_Compound"])
    elif case == "all_nan":
        df[[c for c in df.columns if c.startswith("Cells_")]] = np.nan
    else:
        df["Metadata_MoA"] = "X"
    table = _write_well_table(tmp_path / "wells.csv", df)
    out = tmp_path / "out"
    r = _cli("profiles", "evaluate", str(table), "--out", str(out), cwd=tmp_path)
    text = (r.stdout + r.stderr).strip()
    assert r.returncode == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1 and text.startswith("error:")
    assert "wells.csv" in text
    assert {"no_moa": "Metadata_MoA", "no_compound": "Metadata_Compound", "all_nan": "NaN", "single_moa": "at least 2 MoAs"}[case] in text
    assert not out.exists()  # nothing written, not even the folder


def test_evaluate_outside_a_run_folder_needs_out(tmp_path):
    table = _write_well_table(tmp_path / "wells.csv", _wells())
    r = _cli("profiles", "evaluate", str(table), cwd=tmp_path)
    assert r.returncode == 2 and "--out" in (r.stdout + r.stderr)


# --- real data --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ljosa(data_dir):
    from cellmorph.profiling.tables import annotate_bbbc021, read_profiles

    meta = data_dir / "bbbc021-metadata"
    return annotate_bbbc021(read_profiles(meta / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"), meta)


@pytest.mark.realdata
@pytest.mark.slow
def test_ljosa_table_end_to_end_counts(ljosa, tmp_path):
    assert len(ljosa) == 632 and ljosa["Metadata_Compound"].notna().all() and ljosa["Metadata_MoA"].notna().all()
    ev = evaluate_profiles(ljosa, Recipe())
    m = ev.metrics
    c = m["counts"]
    assert (c["wells"], c["control_wells"], c["treatments"], c["compounds"], c["moas"]) == (632, 330, 103, 38, 12)
    assert m["nsc"]["total"] == 103 and 0 <= m["nsc"]["correct"] <= 103
    assert m["nscb"]["total"] + m["nscb"]["no_candidate"] == 103
    # NSCB as published: Kinase inhibitors (5 treatments, Week7) and Cholesterol-lowering (6, Week9) drop out
    multi = m["nscb_multi_batch"]
    assert multi["moas_dropped"] == ["Cholesterol-lowering", "Kinase inhibitors"] and multi["total"] == 92
    assert multi["correct"] >= m["nscb"]["correct"] - 11  # dropping 11 queries loses at most their hits
    assert m["map"]["queries"] + m["map"]["queries_without_positive"] == 103 and len(m["map"]["per_moa"]) == 12
    assert "per plate to its DMSO wells (330 DMSO wells)" in m["preparation"]["normalisation"]
    assert 0 < m["preparation"]["feature_selection"]["features_kept"] < 516


@pytest.mark.realdata
@pytest.mark.slow
def test_ljosa_table_gallery_recipe_through_the_cli(data_dir, tmp_path):
    meta = data_dir / "bbbc021-metadata"
    r = _cli("profiles", "evaluate", str(meta / "ljosa_jbiomolscreen_2013_per_well_mean.csv.gz"), "--bbbc021-metadata", str(meta),
             "--recipe", "cytominer-gallery-snf", "--out", str(tmp_path / "ljosa"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((tmp_path / "ljosa" / "profile_metrics.json").read_text())
    assert m["recipe_name"] == "cytominer-gallery-snf" and "SNF" in m["similarity"]
    sel = m["preparation"]["feature_selection"]["features_after"]
    assert 516 >= sel["variance_threshold"] >= sel["replicate_correlation"] >= sel["correlation_threshold"] > 0
    # replicate correlation is computed over the treatments with exactly 3 wells (96 of the 103)
    assert m["preparation"]["replicate_correlation"]["treatments"] == 96
    assert "z-score (standardize) per plate to its DMSO wells (330 DMSO wells)" in m["preparation"]["normalisation"]
    assert m["nsc"]["total"] == 103 and m["counts"]["moas"] == 12 and len(m["nsc"]["ci95"]) == 2
    assert f"/{m['nsc']['total']};" in (r.stdout + r.stderr) and (tmp_path / "ljosa" / "profiles.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def quickstart_run(data_dir, tmp_path_factory):
    from cellmorph.config import load_config
    from cellmorph.engine.runner import run_experiment

    out = tmp_path_factory.mktemp("profiles") / "quickstart"
    run_experiment(load_config(REPO / "configs" / "quickstart.toml"), out, data_dir)
    return out


@pytest.mark.realdata
@pytest.mark.slow
def test_embed_subset_roundtrips_through_pycytominer(quickstart_run, data_dir, tmp_path):
    from pycytominer import aggregate

    from cellmorph.profiling.embed import embed
    from cellmorph.profiling.tables import EMBEDDINGS, TREATMENT_PROFILES, WELL_PROFILES

    res = embed(quickstart_run, data=data_dir)
    emb = pd.read_parquet(quickstart_run / EMBEDDINGS)
    feats = [c for c in emb.columns if c.startswith("Image_CNN_tf_efficientnet_lite0_")]
    assert len(emb) == 660 and len(feats) == 1280 and not emb[feats].isna().any().any()
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_MoA"} <= set(emb.columns)
    # pycytominer finds exactly our features by itself and its well medians are ours
    wells = aggregate(emb, strata=["Metadata_Plate", "Metadata_Well"], features="infer", image_features=True, operation="median")
    assert sorted(c for c in wells.columns if not c.startswith("Metadata_")) == sorted(feats)
    ours = pd.read_parquet(quickstart_run / WELL_PROFILES).set_index(["Metadata_Plate", "Metadata_Well"]).sort_index()
    theirs = wells.set_index(["Metadata_Plate", "Metadata_Well"]).sort_index()
    assert len(ours) == 165 and np.allclose(ours[feats].to_numpy(), theirs.loc[ours.index, feats].to_numpy(), atol=1e-6)
    treatments = pd.read_parquet(quickstart_run / TREATMENT_PROFILES)
    assert len(treatments) == 55 and treatments["Metadata_Wells"].sum() == 165 and len(res.treatments) == 55


@pytest.mark.realdata
@pytest.mark.slow
def test_evaluate_run_folder_writes_metrics_plot_and_report(quickstart_run, data_dir):
    from cellmorph.profiling.embed import embed

    if not (quickstart_run / "profiles_well.parquet").is_file():
        embed(quickstart_run, data=data_dir)
    r = _cli("profiles", "evaluate", str(quickstart_run), "--name", "frozen EfficientNet-Lite0", cwd=quickstart_run)
    assert r.returncode == 0, r.stdout + r.stderr
    m = json.loads((quickstart_run / "profile_metrics.json").read_text())
    assert m["nsc"]["total"] == 55 and m["counts"]["moas"] == 6 and m["counts"]["control_wells"] == 0
    assert "no DMSO wells" in m["preparation"]["normalisation"] and len(m["map"]["per_query"]) == 55
    assert (quickstart_run / "profiles.png").stat().st_size > 10_000
    report = (quickstart_run / "report.html").read_text()
    assert 'src="profiles.png"' in report and "NSCB" in report


@pytest.mark.realdata
@pytest.mark.slow
def test_finetuned_run_without_fold_models_is_refused(quickstart_run, data_dir, tmp_path):
    run = tmp_path / "ft"
    run.mkdir()
    for name in ("dataset.json", "metrics.json"):
        (run / name).write_text((quickstart_run / name).read_text())
    (run / "config.toml").write_text((quickstart_run / "config.toml").read_text().replace('mode = "frozen"', 'mode = "finetune"'))
    r = _cli("embed", str(run), "--data", str(data_dir), cwd=tmp_path)
    text = (r.stdout + r.stderr).strip()
    assert r.returncode == 2 and len(text.splitlines()) == 1 and "finetune.save_models=true" in text
    assert not (run / "embeddings.parquet").exists()


@pytest.mark.realdata
@pytest.mark.slow
def test_classifier_embed_equals_the_cached_features(quickstart_run, subset_table):
    from cellmorph.models.classifier import Classifier
    from cellmorph.config import load_config
    from cellmorph.models.features import cached_features
    from cellmorph.data.store import build_store

    cfg = load_config(quickstart_run / "config.toml")
    store = build_store(subset_table, cfg.dataset.image_size)
    cached = cached_features(store, cfg.model, cfg.frozen.tta)
    clf = Classifier(config=cfg).fit(subset_table)
    got = clf.embed(np.asarray(store.images[:4]))
    assert got.shape == (4, 1280) and got.dtype == np.float32
    assert np.allclose(got, cached[:4], atol=1e-3)


def test_pre_logits_are_what_the_classifier_reads():
    """Fine-tuned embeddings are the pooled features fed to the fold model's classifier: logits = head(embedding)."""
    import torch

    from cellmorph.models.factory import create_model
    from cellmorph.models.factory import pre_logits

    torch.manual_seed(0)
    model = create_model("tf_efficientnet_lite0", "random", num_classes=3, in_chans=3).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        emb = pre_logits(model, "test")(x)
        assert emb.shape == (2, model.num_features)
        assert torch.allclose(model.get_classifier()(emb), model(x), atol=1e-5)
