"""Command line: thin. Parses, loads the config, calls one function, prints."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cellmorph.errors import CellmorphError
from cellmorph.progress import console

app = typer.Typer(
    help="cellmorph: classify cellular morphological changes in microscopy images by transfer learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help text is plain text: "pip install 'cellmorph[ray]'" keeps its [ray] (rich markup would eat it)
)

DATA_HELP = "Data folder holding the datasets (default: $CELLMORPH_DATA)."


@app.command()
def run(
    config: Path = typer.Argument(..., help="Experiment config (TOML), e.g. configs/quickstart.toml."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<config name>). Rerun with the same folder to resume."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    set_: list[str] = typer.Option([], "--set", help="Override a config field, e.g. --set seed=1 --set evaluation.protocol=lcbo; --set execution.backend=ray runs the folds as Ray tasks."),
) -> None:
    """Run an experiment: cross-validate, aggregate to treatments, write a run folder.

    Folds run one after another here, or in parallel as Ray tasks with --set execution.backend=ray
    (pip install 'cellmorph[ray]'; docs/scaling.md); the numbers are the same.
    """
    from cellmorph.config import load_config
    from cellmorph.engine.runner import run_experiment

    cfg = load_config(config, set_)
    out = out or Path("runs") / config.stem
    m = run_experiment(cfg, out, data)
    seeds = cfg.seed_list
    console.print(f"[bold green]{cfg.name}[/]: {m.summary_line()}, {m.context['n_folds']} folds, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}")
    from cellmorph.evaluation.metrics import balance_line

    chosen = m.context.get("frozen_C_chosen")
    if chosen:
        from collections import Counter

        counts = Counter(c for c in chosen["per_fold"] if c is not None)
        sets = Counter(f for f in chosen.get("features_per_fold", []) if f is not None)
        console.print(f"frozen \"auto\" (inner {chosen['score']}): " + ", ".join(f"C {c:g} in {n} fold{'s' if n > 1 else ''}" for c, n in sorted(counts.items()))
                      + "".join(f"; {w} features in {n} fold{'s' if n > 1 else ''}" for w, n in sorted(sets.items())), highlight=False, markup=False)
    for line in (m.recall_line("image"), balance_line(m.context.get("class_balance", {}))):
        if line:
            console.print(line, highlight=False, markup=False)
    if m.novelty:
        from cellmorph.evaluation.novelty import summary_line as novelty_line

        console.print(novelty_line(m.novelty))
    elif m.conformal:
        from cellmorph.evaluation.conformal import summary_line as conformal_line

        console.print(conformal_line(m.conformal))
    console.print(f"run folder: {out} (metrics.json, predictions.parquet, report.html)")


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="Experiment config (TOML), e.g. configs/quickstart.toml."),
    grid: list[str] = typer.Option(..., "--grid", "-g", help="A config field and its values, e.g. --grid model.name=resnet50,inception_v3 --grid seed=0,1,2 (values in TOML syntax). Repeat for more axes: every combination runs."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for one run folder per grid point and summary/ (default: runs/<config name>-sweep). Rerun to resume."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    set_: list[str] = typer.Option([], "--set", help="Override a field for every point, e.g. --set execution.backend=ray."),
) -> None:
    """Run a config over a grid of settings (one run folder per point, on the config's backend), then summarize them.

    Example: cellmorph sweep configs/quickstart.toml --grid frozen.C=0.1,1.0 --grid seed=0,1 --set execution.backend=ray
    """
    from cellmorph.engine.sweep import run_sweep

    out = out or Path("runs") / f"{config.stem}-sweep"
    runs, table = run_sweep(config, grid, out, data, set_)
    console.print(table.to_string(index=False))
    console.print(f"{len(runs)} run folders in {out}; summary: {out}/summary/summary.csv, summary.md")


@app.command()
def tune(
    config: Path = typer.Argument(..., help="Experiment config (TOML) with a single-split protocol (random, image-grouped, holdout-25), e.g. configs/nuclei/auto-image-grouped.toml."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Tune folder: candidates/<name>/ (inner split) and final/ (the chosen recipe, outer split). Default: runs/<config name>-tune. Rerun to resume."),
    budget_min: float = typer.Option(45.0, "--budget-min", min=1, help="Minutes for the whole command: candidates start only within the first half; the rest is for the chosen recipe's outer run and final model."),
    candidate: list[str] = typer.Option([], "--candidate", "-c", help="Try only this candidate (repeat for more): frozen, lenet-scratch, resnet18-scratch, finetune-1x, finetune-2x."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    set_: list[str] = typer.Option([], "--set", help="Override a field of the config before the candidates are made, e.g. --set seed=1."),
) -> None:
    """Choose a recipe by nested validation: frozen head, LeNet and ResNet18 from scratch, fine-tuning at 1x and 2x,
    each scored on an inner split of the training rows; the best (balanced accuracy) runs once on the outer split.

    The outer score is the honest one; final/model is trained with the chosen recipe. Candidates and rules:
    cellmorph.engine.tune (docs/own-images.md).

    Example: cellmorph tune configs/nuclei/auto-image-grouped.toml --out runs/nuclei-tune --budget-min 45
    """
    from cellmorph.config import load_config
    from cellmorph.engine.tune import tune as run_tune

    cfg = load_config(config, set_)
    out = out or Path("runs") / f"{config.stem}-tune"
    m = run_tune(cfg, out, data, budget_min, candidate or None)
    rec = m.context["tune"]
    for r in rec["candidates"]:
        score = f"inner balanced accuracy {r['inner']['balanced_accuracy']:.3f}, accuracy {r['inner']['accuracy']:.3f}, {r['seconds']:.0f} s" if r["status"] == "ran" else r["status"]
        console.print(f"  {'*' if r['chosen'] else ' '} {r['name']}: {score}", highlight=False, markup=False)
    console.print(f"[bold green]{cfg.name}[/] with {rec['chosen']} (outer split): {m.summary_line()}")
    console.print(m.recall_line("image"), highlight=False, markup=False)
    console.print(f"tune folder: {out} (final/report.html, final/metrics.json; final/model when save_model)")


BACKEND_HELP = "Where the shards (a plate, or 2,048 of its fields, each) run: local (here) or ray (one Ray task per shard; pip install 'cellmorph[ray]')."
ADDRESS_HELP = "Ray: an existing cluster to join (e.g. auto, ray://head:10001); empty: start a local one (127.0.0.1 only) and stop it after."


def screen_option(name: str):
    """The options `predict` and `embed` share for running a screen's shards (here or on Ray)."""
    return {
        "backend": lambda: typer.Option("local", "--backend", help=BACKEND_HELP),
        "address": lambda: typer.Option("", "--address", help=ADDRESS_HELP),
        "cpus_per_task": lambda: typer.Option(1, "--cpus-per-task", help="Ray: CPUs (and torch threads) per shard task."),
        "gpus_per_task": lambda: typer.Option(0.0, "--gpus-per-task", help="Ray: GPUs per shard task (fractional allowed)."),
    }[name]()


def _execution(backend: str, address: str, cpus_per_task: int, gpus_per_task: float, threads: int):
    """The ExecutionConfig of predict/embed's options (validated as the config's [execution] section)."""
    from cellmorph.config import ExecutionConfig

    if backend not in ("local", "ray"):
        raise CellmorphError(f"--backend {backend}: use local or ray.")
    try:
        return ExecutionConfig(backend=backend, address=address, cpus_per_task=cpus_per_task, gpus_per_task=gpus_per_task, threads=threads)
    except ValueError as err:
        first = (str(err).strip().splitlines() or [""])[-1]
        raise CellmorphError(f"--cpus-per-task/--gpus-per-task/--threads: {first}") from None


@app.command()
def predict(
    model: Path = typer.Argument(..., help="Model bundle: a run's final model (RUN/model, or the run folder RUN) or a folder written by Classifier.save."),
    images: Path = typer.Argument(..., help="Images to predict: a CSV with Image_Path_<Channel> columns (+ Metadata_*), a CellProfiler "
                                           "LoadData CSV (Image_FileName_<Channel> + Image_PathName_<Channel>), or a folder of image files."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: predictions.parquet, wells.csv, treatments.csv, report.html, predict.json."),
    level: float = typer.Option(0.9, "--level", help="Confidence of the conformal prediction sets (0-1); a unit whose set is empty is flagged as none of the known classes."),
    mc_dropout: int = typer.Option(0, "--mc-dropout", help="Fine-tuned models trained with dropout: N Monte Carlo dropout passes (mean and std per class)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier `cellmorph predict` output in --out."),
    novelty: str = typer.Option(None, "--novelty", help="The none-of-known flag: softmax (empty prediction set), distance (far from every "
                                "training unit, novelty.py) or combined (either). Default: combined when the bundle holds reference profiles "
                                "(frozen runs), else softmax."),
    ensemble: bool = typer.Option(False, "--ensemble", help="MODEL is a fine-tuned run folder saved with finetune.save_models = true: "
                                  "the mean of its fold models' probabilities."),
    backend: str = screen_option("backend"),
    address: str = screen_option("address"),
    cpus_per_task: int = screen_option("cpus_per_task"),
    gpus_per_task: float = screen_option("gpus_per_task"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default here, --cpus-per-task on Ray); the same count gives the same bits on both."),
) -> None:
    """Predict new plates: class probabilities per image, well and treatment, conformal prediction sets
    calibrated on the run's out-of-fold scores, and a "none of the known classes" flag.

    Example: cellmorph predict runs/quickstart/model plate7/load_data.csv --out runs/plate7 --level 0.9
    """
    from cellmorph.prediction.predict import predict_images

    ex = _execution(backend, address, cpus_per_task, gpus_per_task, threads)
    res = predict_images(model, images, out, level, mc_dropout=mc_dropout, overwrite=overwrite, novelty=novelty, ensemble=ensemble, execution=ex)
    lv = "treatment" if res.treatments is not None else "well" if res.wells is not None else "image"
    units = res.level(lv)
    line = f"{len(res.images)} images" + (f", {len(units)} {lv}s" if lv != "image" else "") + f"; {res.info['images_per_s']} images/s"
    if "none_of_known" in units.columns:
        size = f"mean set size {units['set_size'].mean():.2f}, " if "set_size" in units.columns else ""
        score = res.novelty.get(lv, {}).get("score", "softmax")
        line += f"; at confidence {level}: {size}{int(units['none_of_known'].sum())} {lv}(s) flagged as none of the known classes ({score} score)"
    else:
        line += "; no conformal calibration in this bundle (no prediction sets)"
    console.print(line)


@app.command()
def summarize(
    runs: list[Path] = typer.Argument(..., help="Run folders to compare (replicate seeds of one setting are pooled)."),
    out: Path = typer.Option(Path("runs/summary"), "--out", "-o", help="Folder for summary.csv, summary.md and curves.png."),
) -> None:
    """Table of final accuracies (mean +- SEM over seeds) and accuracy-vs-epoch curves across runs."""
    from cellmorph.reporting.summary import summarize_runs

    table = summarize_runs(runs, out)
    console.print(table.to_string(index=False))
    console.print(f"written: {out}/summary.csv, summary.md, curves.png")


@app.command()
def explain(
    config: Path = typer.Argument(..., help="The config the weights were trained with."),
    weights: Path = typer.Option(..., "--weights", "-w", help="Fine-tuned weights, e.g. runs/NAME/folds/00/model.pt (finetune.save_models = true)."),
    out: Path = typer.Option(Path("runs/explain"), "--out", "-o", help="Folder for activation_maximization.png and gradcam.png."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    layer: list[str] = typer.Option([], "--layer", help="Layer (module name) to visualise; repeat for several. Default: the model's feature stages."),
    filters: str = typer.Option("0,1,2,3,4,5", "--filters", help="Comma-separated filter indices."),
    images: int = typer.Option(8, "--images", help="Held-out images for Grad-CAM."),
    steps: int = typer.Option(128, "--steps", help="Gradient-ascent steps for activation maximisation."),
) -> None:
    """Look inside: activation maximisation (before vs after fine-tuning) and Grad-CAM overlays."""
    from cellmorph.config import load_config
    from cellmorph.reporting.explain import explain_run

    try:
        filter_ids = [int(f) for f in filters.split(",") if f.strip()]
    except ValueError:
        raise CellmorphError(f"--filters '{filters}': expected comma-separated integers, e.g. 0,1,2,3") from None
    cfg = load_config(config)
    info = explain_run(cfg, weights, out, data, layers=layer or None, filters=filter_ids, n_images=images, steps=steps, device_name=cfg.device)
    console.print(f"layers {', '.join(info['layers'])}; written: {out}/activation_maximization.png, {out}/gradcam.png")


@app.command()
def datasets() -> None:
    """List the datasets cellmorph knows."""
    from cellmorph.data.catalog import available

    t = Table("name", "description")
    for name, desc in sorted(available().items()):
        t.add_row(name, desc)
    console.print(t)


@app.command()
def download(
    name: str = typer.Argument(..., help="Dataset to fetch (bbbc021-subset, bbbc021-raw, bbbc014)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
) -> None:
    """Download a dataset from its public source into the data folder, checking every file's SHA-256."""
    import os

    from cellmorph.data.catalog import downloader

    fetch = downloader(name)
    folder = data or os.environ.get("CELLMORPH_DATA")
    if not folder:
        raise CellmorphError("say where to put the data: --data DIR or CELLMORPH_DATA=DIR.")
    path = fetch(Path(folder))
    console.print(f"{name}: {path} (checksums verified)")


@app.command()
def prepare(
    name: str = typer.Argument(..., help="What to prepare: plate (your own plates: --images CSV + --platemap), or the presets bbbc021, bbbc013, bbbc014."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the prepared store (images.npy, index.parquet, prepared.json)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP + " Not needed for `plate`."),
    images: Optional[Path] = typer.Option(None, "--images", help="plate: the LoadData CSV (Image_FileName_/Image_PathName_<Ch>) or folder-format CSV "
                                          "(Image_Path_<Ch>) of raw single-channel files. bbbc021: folder of the plate folders (default: DATA/bbbc021-raw)."),
    platemap: Optional[Path] = typer.Option(None, "--platemap", help="plate: CSV, one row per well: Metadata_Well and Metadata_* columns "
                                            "(compound, concentration, label); Metadata_Plate too when plates differ."),
    channels: Optional[str] = typer.Option(None, "--channels", help="plate: comma-separated channels to keep, in store order (default: all, as in the CSV)."),
    controls: Optional[str] = typer.Option(None, "--controls", help="plate: the control compound that normalises each plate (default DMSO)."),
    control_column: Optional[str] = typer.Option(None, "--control-column", help="plate: the column holding it (default Metadata_Compound)."),
    normalise: Optional[str] = typer.Option(None, "--normalise", help="plate: controls (z-score by the plate's control pixels, the paper's; default) "
                                            "or field (each field's own min-max; no controls needed)."),
    crops: Optional[str] = typer.Option(None, "--crops", help="plate: ROWSxCOLUMNS crops per field (default 2x2; 1x1: whole fields)."),
    keep_empty: Optional[bool] = typer.Option(None, "--keep-empty", help="plate: keep near-empty crops (default: dropped, the paper's rule).", show_default=False),
    include_controls: Optional[bool] = typer.Option(None, "--include-controls", help="plate: write the control fields too (e.g. DMSO as a class).", show_default=False),
    illumination: Optional[str] = typer.Option(None, "--illumination", help="plate: none (default) or plate: divide by a per-plate, per-channel illumination function."),
    plates: Optional[str] = typer.Option(None, "--plates", help="bbbc021: comma-separated plates to prepare (default: all in the metadata)."),
    image_size: int = typer.Option(0, "--image-size", help="Resize each crop to N x N (default 0: keep the crop size; bbbc021: 512 x 640)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Threads reading and normalising fields (default: CPU count)."),
    ome_zarr: Optional[Path] = typer.Option(None, "--ome-zarr", help="Also write the prepared images as OME-Zarr HCS plates in this new (or empty) "
                                            "folder: PLATE.zarr per plate (each crop a field of its well) and platemap.csv, for napari or "
                                            "`cellmorph run` with dataset omezarr."),
) -> None:
    """Preprocess raw plates as Kensert et al. 2019 into a store that training reads (dataset.name = "prepared").

    Your own plate: cellmorph prepare plate --images load_data.csv --platemap platemap.csv --channels DNA,ER,RNA,AGP,Mito --out store
    """
    import os

    from cellmorph.data.registry import DATA_ENV, resolve_data_dir
    from cellmorph.data.catalog import prepare as run_prepare

    given = {"images_root": images, "plates": [p.strip() for p in plates.split(",")] if plates else None, "image_size": image_size or None,
             "platemap": platemap, "channels": [c.strip() for c in channels.split(",") if c.strip()] if channels else None,
             "controls": controls, "control_column": control_column, "normalise": normalise, "crops": crops, "keep_empty": keep_empty,
             "include_controls": include_controls, "illumination": illumination}
    kw = {"workers": workers, **{k: v for k, v in given.items() if v is not None}}  # the dataset's prepare says which it takes
    needs_data = name != "plate" or data is not None or os.environ.get(DATA_ENV)
    if ome_zarr is not None:  # refused before any field is read, not after an hour of preparing
        from cellmorph.data.omezarr import check_export_folder

        check_export_folder(ome_zarr)
    recipe = run_prepare(name, resolve_data_dir(data) if needs_data else None, out, **kw)
    console.print(f"{name}: {recipe['n_images']} images of {'x'.join(map(str, recipe['image_shape']))} in {out} (prepared.json says how)")
    if recipe.get("crops_dropped"):
        console.print(f"{len(recipe['crops_dropped'])} near-empty crops dropped (listed in prepared.json)")
    if ome_zarr is not None:
        from cellmorph.data.omezarr import write_prepared_plates

        written = write_prepared_plates(out, ome_zarr)
        console.print(f"OME-Zarr: {len(written)} plate(s) in {ome_zarr} ({', '.join(p.name for p in written)}) and platemap.csv")


@app.command()
def embed(
    source: Path = typer.Argument(..., help="A run folder (cellmorph run) or a model bundle (Classifier.save)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for embeddings.parquet, profiles_well.parquet, profiles_treatment.parquet (default: the run folder; required for a bundle)."),
    data: Optional[Path] = typer.Option(None, "--data", "-d", help=DATA_HELP),
    images: Optional[Path] = typer.Option(None, "--images", help="New images to embed with the model (a CSV or a folder, as `cellmorph predict` reads them) "
                                          "instead of its own dataset: streamed shard by shard, resumable."),
    backend: str = screen_option("backend"),
    address: str = screen_option("address"),
    cpus_per_task: int = screen_option("cpus_per_task"),
    gpus_per_task: float = screen_option("gpus_per_task"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default here, --cpus-per-task on Ray)."),
) -> None:
    """Per-image embeddings (parquet, Metadata_* + Image_CNN_* columns) and median well and treatment profiles.

    A frozen run reuses its cached backbone features; a fine-tuned run embeds each image with the fold model that held it out (needs finetune.save_models = true).
    With --images, a screen's new images through the model, shard by shard (plates), here or on Ray (--backend ray).

    Example: cellmorph embed runs/quickstart; cellmorph embed runs/quickstart/model --images plate7/load_data.csv --out runs/plate7-emb
    """
    from cellmorph.profiling.embed import embed as run_embed

    if images is None and backend != "local":
        raise CellmorphError("--backend ray embeds new images (--images): a run folder's own embeddings come from its cache or fold models.")
    res = run_embed(source, out, data, images=images, execution=_execution(backend, address, cpus_per_task, gpus_per_task, threads))
    e = res.embeddings
    n_feat = sum(c.startswith("Image_CNN_") for c in e.columns)
    console.print(f"{len(e)} images x {n_feat} features ({res.how})")
    if res.wells is not None:
        console.print(f"{len(res.wells)} well profiles, {len(res.treatments)} treatment profiles (median of images per well, then of wells per treatment)")
    console.print(f"written: {res.out}/embeddings.parquet" + (", profiles_well.parquet, profiles_treatment.parquet" if res.wells is not None else ""))


profiles_app = typer.Typer(help="Profile tables: NSC/NSCB and mAP of MoA retrieval (pycytominer + copairs).", no_args_is_help=True)
app.add_typer(profiles_app, name="profiles")


@profiles_app.command("evaluate")
def profiles_evaluate(
    profiles: Path = typer.Argument(..., help="Per-well profiles: a run folder after `cellmorph embed`, or a parquet/CSV table (Metadata_Compound, Metadata_MoA, Metadata_Plate/Well, features)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for profile_metrics.json and profiles.png (default: the run folder, whose report.html then shows them)."),
    bbbc021_metadata: Optional[Path] = typer.Option(None, "--bbbc021-metadata", help="Annotate a BBBC021 table keyed by plate/well (e.g. Ljosa et al.'s CellProfiler per-well means) from this folder's BBBC021_v1_image.csv.gz and BBBC021_v1_moa.csv."),
    recipe: str = typer.Option("default", "--recipe", help="default (robust z-score per plate to DMSO, pycytominer feature selection, median treatment profiles, cosine), "
                               "cytominer-gallery (the cytominer gallery's published recipe for the Ljosa table: selection on raw wells incl. replicate correlation >= 0.5, "
                               "z-score per plate to DMSO, mean treatment profiles, Pearson correlation) or cytominer-gallery-snf (the same, then similarity network fusion). See docs/profiles.md."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Override the recipe's normalisation: mad_robustize (robust z-score per plate to its DMSO wells; to all wells without DMSO), standardize (z-score) or none."),
    feature_select: Optional[bool] = typer.Option(None, "--feature-select/--no-feature-select", help="Override the recipe's feature selection (default recipe: pycytominer variance_threshold, correlation_threshold, drop_na_columns, blocklist)."),
    sphere: Optional[bool] = typer.Option(None, "--sphere/--no-sphere", help="Sphering (pycytominer ZCA-cor) fitted on the DMSO wells, after feature selection (off in every recipe)."),
    control: str = typer.Option("DMSO", "--control", help="The control's name in Metadata_Compound or Metadata_MoA."),
    name: Optional[str] = typer.Option(None, "--name", help="Name of the representation in the results (default: the file's name)."),
) -> None:
    """NSC and NSCB (1-NN, not-same-compound / -or-batch; cosine, or the recipe's similarity) and copairs mAP of treatment profiles by MoA.

    Example: cellmorph profiles evaluate ljosa_jbiomolscreen_2013_per_well_mean.csv.gz --bbbc021-metadata DIR --out runs/ljosa --recipe cytominer-gallery-snf
    """
    from cellmorph.profiling.evaluate import evaluate, summary_line
    from cellmorph.profiling.recipes import Recipe

    if normalize is not None and normalize not in ("mad_robustize", "standardize", "none"):
        raise CellmorphError(f"--normalize {normalize!r}: choose mad_robustize, standardize or none.")
    overrides = {k: v for k, v in dict(normalize=normalize, feature_select=feature_select, sphere=sphere).items() if v is not None}
    ev = evaluate(profiles, out, Recipe.preset(recipe, control=control, **overrides), bbbc021_metadata, name)
    console.print(summary_line(ev.metrics), highlight=False, markup=False)
    where = out if out is not None else (profiles if profiles.is_dir() else profiles.parent)
    console.print(f"written: {where}/profile_metrics.json, profiles.png")


INTERRUPTED = "interrupted; rerun the same command to resume"
TERMINATED = "terminated (SIGTERM); rerun the same command to resume"


class _Interrupted(BaseException):
    """Ctrl-C (SIGINT) during a command. Not a KeyboardInterrupt: typer turns that into a silent exit 130
    before it reaches main(). A BaseException, so that `except Exception` blocks let it through while
    cleanup code (`except BaseException: ...; raise`, `finally`) still runs."""


class _Terminated(_Interrupted):
    """SIGTERM (kill PID, a batch scheduler's time limit, docker stop): the same path as Ctrl-C (temporaries
    removed, locks released by the `with` blocks they belong to), then its own line and exit 143 (128 + 15)."""


def _raise_interrupted(signum, frame):
    raise _Terminated() if signum == signal.SIGTERM else _Interrupted()


def one_line(message: str) -> str:
    """A message of several lines (e.g. a config error's header, one "- field ..." line per field, the fix)
    as the one line the CLI prints: "header: item; item. Fix ..."."""
    parts = [ln.strip().removeprefix("- ").strip() for ln in message.splitlines() if ln.strip()]
    out = parts[0] if parts else ""
    for k, part in enumerate(parts[1:]):
        if out.endswith((".", ":", ";", "!", "?")):
            out += " " + part
        else:
            out += (": " if k == 0 else ". " if part[:1].isupper() else "; ") + part
    return out


def main() -> None:
    """Run the CLI: a CellmorphError (or a full disk anywhere) is one line and exit 2; Ctrl-C is the one
    line "interrupted; rerun the same command to resume" and exit 130, SIGTERM "terminated (SIGTERM); rerun
    the same command to resume" and exit 143."""
    from cellmorph.io import NO_SPACE, is_no_space

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, _raise_interrupted)
        except ValueError:  # not the main thread (main() called from a thread): keep the default handling
            break
    try:
        app()
    except CellmorphError as err:
        console.print(f"[bold red]error:[/] {one_line(str(err))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except _Terminated:
        console.print(TERMINATED, highlight=False, soft_wrap=True)
        sys.exit(128 + signal.SIGTERM)
    except (_Interrupted, KeyboardInterrupt):
        console.print(INTERRUPTED, highlight=False, soft_wrap=True)
        sys.exit(130)
    except OSError as err:
        if err.errno in NO_SPACE or is_no_space(err):  # a write outside cellmorph.io's helpers
            where = f" writing {err.filename}" if err.filename else ""
            console.print(f"[bold red]error:[/] no space left on the device{where}; free space and rerun the same command (it resumes).", highlight=False, soft_wrap=True)
            sys.exit(2)
        raise
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


if __name__ == "__main__":
    main()
