"""Recipe selection by nested validation: `cellmorph tune CONFIG --out OUT --budget-min 45`.

A fixed, documented set of candidate recipes (`candidates`) is tried on the **inner** split: the outer
single split's training rows split again by the protocol's own rule (`evaluation.validation = true`:
split seed + 1, grouped like the outer split, its test rows unused). The candidate with the best inner
balanced accuracy (ties: the earlier one) is then run once on the **outer** split: that score is the
honest one, and its final model bundle (`save_model`) is trained with the chosen recipe.

    OUT/candidates/<name>/   one run folder per candidate, scored on the inner split (no final model)
    OUT/final/               the chosen recipe on the outer split: metrics.json (context.tune: every
                             candidate's inner scores, wall time and status), report.html, model/

The candidates, in the order they run (`native` = the images' side in pixels as the store holds them):

| name | what |
|---|---|
| frozen | the config's ImageNet network (EfficientNet-Lite0 when the config's is not pretrained) frozen, logistic head; stage-pooled or last-layer features and C chosen by an inner split (frozen.features = frozen.C = "auto") |
| lenet-scratch | the course lab's LeNet, Glorot init, at max(native, 64) px; Adam 1e-3, cosine, 10 epochs |
| resnet18-scratch | ResNet18 (timm), Glorot init, at native px; Adam 1e-3, cosine, 8 epochs |
| finetune-1x | the config's ImageNet network fine-tuned at native px (capped at 224); Adam 3e-4, cosine, 3 epochs (a quick look at the native scale) |
| finetune-2x | the same at 2 x native px (capped at 224; absent when that equals finetune-1x), 10 epochs |

Every fine-tuning candidate: dihedral augmentation only (no intensity jitter) and the same 8 dihedral views
averaged at test and prediction time (`finetune.tta`), training-mean subtraction (`normalize = "mean"`), batch 100
at <= 64 px and 32 above, class weights as the config says, no curves.
Budget: a candidate starts only while the selection has used less than half of `budget_min`; the other
half is kept for the chosen recipe's outer run and final model. A candidate that does not start is listed
as skipped, with the reason. Rerunning the same command resumes: finished candidates are read back.

Single-split protocols only (random, image-grouped, holdout-25): under leave-one-compound-out every fold
would need its own inner selection of fine-tuned networks (use frozen.C / frozen.features = "auto" there,
which choose inside each fold).
"""

from __future__ import annotations

import time
from pathlib import Path

from cellmorph.config import ExperimentConfig, override
from cellmorph.data.store import open_store
from cellmorph.engine.plan import plan_run
from cellmorph.engine.runner import run_experiment
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.protocols import get as get_protocol
from cellmorph.evaluation.metrics import Metrics
from cellmorph.models.names import TORCHVISION_MODELS, is_local
from cellmorph.progress import console

SCORE = "balanced_accuracy"  # of the image level, on the inner split
MAX_FINETUNE_SIZE = 224
CANDIDATE_NAMES = ("frozen", "lenet-scratch", "resnet18-scratch", "finetune-1x", "finetune-2x")


def _finetune(size: int, name: str, init: str, lr: float, epochs: int) -> dict:
    return {"mode": "finetune", "model.name": name, "model.init": init, "model.input_size": size,
            "finetune.optimizer": "adam", "finetune.lr": lr, "finetune.schedule": "cosine", "finetune.epochs": epochs,
            "finetune.batch_size": 100 if size <= 64 else 32, "finetune.normalize": "mean",
            "finetune.head_lr_mult": 1.0, "finetune.backbone_lr_mult": 1.0,
            "finetune.eval_every_epoch": False, "finetune.eval_epochs": [], "finetune.eval_every_iterations": 0,
            "finetune.augment.dihedral": True, "finetune.tta": True, "finetune.augment.jitter_scale": 0.0, "finetune.augment.jitter_shift": 0.0,
            "finetune.augment.blur_p": 0.0, "finetune.augment.noise_std": 0.0}


def candidates(cfg: ExperimentConfig, native: int) -> dict[str, dict]:
    """The candidate recipes for images of side `native`, as {name: config overrides} in the order they run.

    Example:
        >>> list(candidates(load_config("configs/nuclei/auto-image-grouped.toml"), 32))
        ['frozen', 'lenet-scratch', 'resnet18-scratch', 'finetune-1x', 'finetune-2x']
    """
    pretrained = cfg.model.name if cfg.model.init == "imagenet" and not is_local(cfg.model.name) else "tf_efficientnet_lite0"
    # stage-pooled features need a timm network (models/backbone.py: StagePooled); torchvision's read the last layer
    frozen = {"mode": "frozen", "frozen.C": "auto", "frozen.features": "last" if pretrained in TORCHVISION_MODELS else "auto"}
    if pretrained != cfg.model.name or cfg.model.init != "imagenet":
        frozen.update({"model.name": pretrained, "model.init": "imagenet", "model.input_size": 0})
    one, two = min(native, MAX_FINETUNE_SIZE), min(2 * native, MAX_FINETUNE_SIZE)
    out = {"frozen": frozen,
           "lenet-scratch": _finetune(max(native, 64), "lenet", "xavier", 1e-3, 10),
           "resnet18-scratch": _finetune(native, "resnet18", "xavier", 1e-3, 8),
           "finetune-1x": _finetune(one, pretrained, "imagenet", 3e-4, 3)}
    if two != one:
        out["finetune-2x"] = _finetune(two, pretrained, "imagenet", 3e-4, 10)
    return out


def native_size(cfg: ExperimentConfig, data_dir: str | Path | None = None) -> int:
    """The side in pixels of the config's images as the store holds them (after dataset.image_size); one image decoded."""
    plan = plan_run(cfg, data_dir)
    return int(open_store(plan.table, cfg.dataset.image_size).shape[-1])


def _inner(m: Metrics) -> dict:
    lv = m.level("image")
    ece = (m.conformal.get("levels", {}).get("image") or {}).get("ece")
    return {"accuracy": round(lv.accuracy, 4), SCORE: round(lv.balanced_accuracy, 4), "macro_f1": round(lv.macro_f1, 4),
            "ece": None if ece is None else round(ece, 4), "images": lv.total}


def tune(cfg: ExperimentConfig, out: str | Path, data_dir: str | Path | None = None, budget_min: float = 45.0,
         only: list[str] | None = None) -> Metrics:
    """Choose a recipe by nested validation and run it on the outer split (module docstring); return its Metrics.

    Args:
        cfg: the user's config: its dataset, label, protocol (single split), seed and frozen network are kept.
        out: the tune folder (OUT/candidates/<name>/, OUT/final/); rerun to resume.
        budget_min: minutes for the whole command; candidates start only within the first half.
        only: run only these candidates (names from CANDIDATE_NAMES), e.g. for a quick look.

    Example:
        >>> m = tune(load_config("configs/nuclei/auto-image-grouped.toml"), "runs/nuclei-tune", budget_min=45)
        >>> m.context["tune"]["chosen"], m.level("image").accuracy
    """
    out = Path(out)
    protocol = get_protocol(cfg.evaluation.protocol)
    if not protocol.single_split:
        raise CellmorphError(f"cellmorph tune needs a single-split protocol (random, image-grouped, holdout-25); this config's is "
                             f"'{cfg.evaluation.protocol}'. Under it, frozen.C = \"auto\" and frozen.features = \"auto\" choose inside each fold.")
    if len(cfg.seed_list) > 1:
        raise CellmorphError("cellmorph tune runs one seed; set seed = N and drop seeds = [...].")
    unknown = sorted(set(only or []) - set(CANDIDATE_NAMES))
    if unknown:
        raise CellmorphError(f"unknown candidate(s) {unknown}; the candidates are {', '.join(CANDIDATE_NAMES)}.")
    base = override(cfg, {"evaluation.validation": False})
    native = native_size(base, data_dir)
    recipes = {k: v for k, v in candidates(base, native).items() if not only or k in only}
    if not recipes:
        raise CellmorphError(f"no candidate left to try at {native} px with {only}.")
    configs = {k: override(base, {**v, "name": f"{cfg.name} [tune: {k}]", "evaluation.validation": True, "save_model": False}, f"tune candidate {k}")
               for k, v in recipes.items()}  # every candidate validated before the first one runs
    t0, rows = time.perf_counter(), []
    for k, c in configs.items():
        used = time.perf_counter() - t0
        row = {"name": k, "recipe": recipes[k], "folder": f"candidates/{k}"}
        if used > budget_min * 60 / 2:
            rows.append({**row, "status": f"skipped: {used / 60:.1f} of the {budget_min:g} minutes used before it could start "
                                          "(candidates start only in the first half of the budget)"})
            console.print(f"tune: {k} skipped (budget)", highlight=False, markup=False)
            continue
        console.print(f"[bold]tune candidate {len(rows) + 1}/{len(configs)}[/]: {k} (inner split) -> {out / 'candidates' / k}")
        s = time.perf_counter()
        m = run_experiment(c, out / "candidates" / k, data_dir)
        row.update(status="ran", inner=_inner(m), seconds=round(time.perf_counter() - s, 1))
        console.print(f"  {k}: inner balanced accuracy {row['inner'][SCORE]:.3f}, accuracy {row['inner']['accuracy']:.3f} "
                      f"({row['seconds']:.0f} s)", highlight=False, markup=False)
        rows.append(row)
    ran = [r for r in rows if r["status"] == "ran"]
    best = max(ran, key=lambda r: (r["inner"][SCORE], -rows.index(r)))  # ties: the earlier candidate
    for r in rows:
        r["chosen"] = r is best
    selecting = round(time.perf_counter() - t0, 1)
    record = {"score": "image balanced accuracy on the inner split", "native_px": native, "budget_min": budget_min,
              "inner_split": "the outer split's training rows split again by the protocol's own rule (split seed + 1); the outer test rows unused",
              "chosen": best["name"], "seconds_selecting": selecting, "candidates": rows}
    console.print(f"tune: chose {best['name']} (inner balanced accuracy {best['inner'][SCORE]:.3f}); now the outer split -> {out / 'final'}",
                  highlight=False, markup=False)
    final = override(base, {**best["recipe"], "name": f"{cfg.name} [tuned: {best['name']}]"}, f"tune: {best['name']}")
    return run_experiment(final, out / "final", data_dir, context={"tune": record})
