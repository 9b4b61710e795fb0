"""Experiment configuration: one TOML file per experiment, validated by pydantic.

Unknown keys are errors (a typo must not silently fall back to a default), and every
error names the file and the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cellmorph.errors import CellmorphError

MAX_SEED = (2**32 - 1 - 999) // 1000  # a fold is seeded with seed * 1000 + fold index, which numpy needs below 2**32


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetConfig(_Strict):
    name: str = "bbbc021-subset"
    # Dataset-specific options, e.g. {csv = "my_plates.csv"} for the "folder" dataset.
    options: dict = Field(default_factory=dict)
    # Images are resized to this square size when the store is built (0 = keep native size).
    image_size: int = Field(0, ge=0)
    label: str = "Metadata_MoA"


class ModelConfig(_Strict):
    name: str = "tf_efficientnet_lite0"
    # "imagenet", "xavier", "gaussian" (Caffe's N(0, 0.01) weights and zero biases, as AlexNet and
    # GenderNet), "random", or the path of a weights file.
    init: str = "imagenet"
    # Square input size fed to the network; 0 = the architecture's own (timm pretrained_cfg: 224
    # for ResNet50 and EfficientNet-Lite0, 299 for the Inception models).
    input_size: int = Field(0, ge=0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)


class FrozenConfig(_Strict):
    # Average features over the 8 dihedral transforms of each image.
    tta: bool = False
    batch_size: int = Field(32, ge=1)
    # Inverse L2 strength of the logistic-regression head; "auto": chosen per training fold by an inner split grouped
    # like the protocol, among 0.01, 0.1, 1 and 10, by balanced accuracy (models/features.py: choose_C).
    C: float | str = 1.0
    class_weight: Literal["balanced", "none"] = "balanced"
    # "last": the backbone's pooled last-layer features; "stages": those plus the global average of every stage's
    # output (small textures live in early stages; models/backbone.py: StagePooled). Needs a timm network.
    # "auto": the stage-pooled vector is extracted, and each training fold's inner split (as for C = "auto") chooses
    # whether the head reads all of it or only its last-layer part (models/features.py: choose_C).
    features: Literal["last", "stages", "auto"] = "last"

    @property
    def stage_pooled(self) -> bool:
        """Whether the network's features are the stage-pooled vector (features = "stages" or "auto")."""
        return self.features != "last"

    @field_validator("C")
    @classmethod
    def _positive_or_auto(cls, v):
        if v == "auto" or (isinstance(v, float) and v > 0):
            return v
        raise ValueError('should be a positive number, or "auto"')


class AugmentConfig(_Strict):
    dihedral: bool = True
    # Per-channel intensity: x * U(1-s, 1+s) + U(-shift, shift), on the 0-1 scale.
    jitter_scale: float = Field(0.1, ge=0)
    jitter_shift: float = Field(0.05, ge=0)
    blur_p: float = Field(0.25, ge=0, le=1)
    noise_std: float = Field(0.02, ge=0)
    # H&E stain jitter (Tellez et al. 2018): each image's haematoxylin, eosin and DAB optical densities (Ruifrok &
    # Johnston's colour deconvolution) scaled by U(1-s, 1+s) and shifted by U(-s, s); 0 = off, 0.05 = "HED-light".
    # RGB brightfield only (3 channels).
    hed_jitter: float = Field(0.0, ge=0, le=1)


class FinetuneConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    # "inv": Caffe's lr = lr * (1 + inv_gamma * iteration) ** -inv_power (Bayramoglu & Heikkilae 2016).
    schedule: Literal["constant", "cosine", "inv"] = "constant"
    inv_gamma: float = Field(0.001, ge=0)
    inv_power: float = Field(0.75, ge=0)
    # Learning-rate multipliers per layer group (Caffe's lr_mult): the new output layer (head) and
    # every other, copied layer (backbone). E.g. 10 and 1: the new head learns 10x faster.
    head_lr_mult: float = Field(1.0, ge=0)
    backbone_lr_mult: float = Field(1.0, ge=0)
    class_weights: bool = True
    # "imagenet": the model's own mean/std; "raw": 0-255 pixels as the paper's code fed them;
    # "mean": the training images' per-channel mean intensity is subtracted instead of the model's mean
    # (Caffe's mean subtraction), then divided by the model's std; "caffe": 0-255 pixels minus the
    # training images' mean, not divided (Caffe's input for AlexNet/GenderNet with init = "gaussian").
    normalize: Literal["imagenet", "raw", "mean", "caffe"] = "imagenet"
    amp: bool = True
    # torch.compile the model (CUDA; the first epoch pays the compile time).
    compile: bool = False
    # Score the test fold after every epoch, after the listed epochs, or every N iterations:
    # accuracy curves in metrics.json (Kensert et al.'s Fig 3 and 4, Bayramoglu & Heikkilae's Fig 2).
    eval_every_epoch: bool = False
    eval_epochs: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list)
    eval_every_iterations: int = Field(0, ge=0)
    # Keep each fold's trained weights (folds/NN/model.pt), e.g. for `cellmorph explain`.
    save_models: bool = False
    # Test-time augmentation: average the network's outputs (logits; pre-logit features for embeddings) over the
    # 8 dihedral transforms of each image when scoring test folds and predicting: the symmetries that
    # augment.dihedral trains for. 8x the inference cost; MC dropout passes are not augmented.
    tta: bool = False
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class EvaluationConfig(_Strict):
    # How rows are split into folds: any registered protocol (cellmorph.evaluation.protocols.names(); an unknown
    # name is refused when the run is planned, before anything is written, with the list). The built-in ones:
    # "loco": leave-one-compound-out; "lcbo": leave-compound-and-batch-out (the test compound and
    # every image of its batch/week are held out of training); "logo": leave-one-group-out over the
    # column `group`; "group-kfold": `n_splits` folds of whole groups; "predefined": one fold per
    # value of `group` (e.g. Metadata_Fold); "random", "image-grouped", "holdout-25": one split;
    # "lomo": leave-one-MoA-out, novelty detection by conformal prediction sets (frozen mode only).
    protocol: str = Field("loco", min_length=1)
    # The grouping column ("" = the protocol's own: Metadata_Compound for loco/lcbo, Metadata_Image for
    # image-grouped, Metadata_Fold for predefined; logo and group-kfold need it set).
    group: str = ""
    n_splits: int = Field(5, ge=2)
    # Held-out fraction of the single-split protocols (0 = the protocol's own: 1/6 for random and
    # image-grouped, as Bayramoglu & Heikkilae; 0.25 for holdout-25) and their split seed.
    test_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    split_seed: int = 0
    # Choose a recipe without looking at the test rows: score a validation split drawn (by the same
    # rule, split seed + 1) from the training rows of the single split instead of its test rows. Then
    # report the test once, with this off.
    validation: bool = False
    # Levels scored: "auto" = what the data hold (image; well where Metadata_Well exists; treatment
    # where compound and concentration exist too), or a list such as ["image"].
    levels: Literal["auto"] | list[Literal["image", "well", "treatment"]] = "auto"
    # How image probabilities become well (and well -> treatment) probabilities: the paper's median,
    # or the mean (Kensert et al.'s translocation experiment averages the crops of a well).
    aggregate: Literal["median", "mean"] = "median"
    # Run only the first N folds (0 = all); for smoke tests and CI.
    max_folds: int = Field(0, ge=0)
    # lomo only: what flags a unit as "none of the known MoAs" at 0.9 (cellmorph.evaluation.novelty).
    # "softmax": its conformal prediction set is empty (1 - the largest p-value of the classifier's
    # probabilities); "distance": conformal anomaly detection on the frozen features (the p-value of
    # its cosine distance to the nearest known unit is <= 0.1); "combined": either of the two.
    novelty_score: Literal["softmax", "distance", "combined"] = "softmax"

    @model_validator(mode="after")
    def _check_novelty(self):
        if self.novelty_score != "softmax" and self.protocol != "lomo":
            raise ValueError(f"novelty_score = {self.novelty_score!r} applies to protocol = 'lomo' only (this config's protocol is {self.protocol!r})")
        return self


class ExecutionConfig(_Strict):
    """Where the folds run (docs/scaling.md). Each (fold, seed) is one task; the numbers do not depend
    on the backend. `cellmorph run CONFIG --set execution.backend=ray` scales out without editing the file."""

    # "local": one fold after another in this process; "ray": every (fold, seed) a Ray task
    # (pip install 'cellmorph[ray]'), run in parallel on a local or an existing cluster.
    backend: Literal["local", "ray"] = "local"
    # Ray: the address of an existing cluster to join (e.g. "auto" or "ray://head:10001"); "" = start a
    # local one on this machine for the run and stop it after. The run folder must be on a filesystem
    # the cluster's workers share (each task writes its own fold folder).
    address: str = ""
    # Ray: CPUs a started local cluster gets (0 = all of this machine's); parallel tasks = num_cpus / cpus_per_task.
    num_cpus: int = Field(0, ge=0)
    # Ray: resources reserved per task; torch runs cpus_per_task threads in a task. gpus_per_task may be
    # fractional (0.5: two folds share a GPU); 0 = CPU tasks.
    cpus_per_task: int = Field(1, ge=1)
    gpus_per_task: float = Field(0.0, ge=0)
    # torch threads a fine-tuning fold runs on, on either backend (0 = torch's default locally, cpus_per_task
    # on Ray). A CPU fine-tune's numbers depend on it (float sums split across threads): compare a local run
    # with a Ray run at the same count, e.g. threads = 1 with cpus_per_task = 1 (docs/scaling.md).
    threads: int = Field(0, ge=0)
    # Ray: retries of a task whose worker died or that raised an unexpected error; an error in the
    # user's input (a CellmorphError: bad image, weights file, ...) stops the run at once.
    max_retries: int = Field(2, ge=0)


class ExperimentConfig(_Strict):
    name: str = "experiment"
    # Training seed (numpy and torch take 0 .. 2**32 - 1).
    seed: int = Field(0, ge=0, le=MAX_SEED)
    # Replicate seeds run into one run folder (metrics as mean +- SEM); empty = just `seed`.
    seeds: list[Annotated[int, Field(ge=0, le=MAX_SEED)]] = Field(default_factory=list)
    mode: Literal["frozen", "finetune"] = "frozen"
    # "auto" picks CUDA when available.
    device: str = "auto"
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    frozen: FrozenConfig = Field(default_factory=FrozenConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    # How the folds are dispatched (local loop or Ray tasks); not part of what is computed.
    execution: ExecutionConfig = Field(default_factory=ExecutionConfig)
    # Extra outputs of the run folder beyond metrics, predictions and report (outputs.py lists them),
    # e.g. ["dose_response"] for a translocation plate.
    outputs: list[str] = Field(default_factory=list)
    # Also fit the final model on ALL labelled rows (the folds' recipe) and save it as a bundle in the run
    # folder (RUN/model/), with the cross-validation's out-of-fold predictions as its conformal calibration
    # data, for `cellmorph predict`. With several seeds: the first seed's model and out-of-fold predictions.
    save_model: bool = True

    @property
    def seed_list(self) -> list[int]:
        """The training seeds of this run: `seeds`, or [`seed`]."""
        return list(self.seeds) or [self.seed]

    @model_validator(mode="after")
    def _check(self):
        if len(set(self.seed_list)) != len(self.seed_list):
            raise ValueError(f"seeds {self.seeds} repeat a seed")
        if self.finetune.eval_epochs and max(self.finetune.eval_epochs) > self.finetune.epochs:
            raise ValueError(f"finetune.eval_epochs {self.finetune.eval_epochs} go past finetune.epochs = {self.finetune.epochs}")
        if self.frozen.C == "auto" and self.evaluation.protocol == "lomo":
            raise ValueError('frozen.C = "auto" is not available under the lomo protocol; give a number, e.g. frozen.C = 1.0')
        if self.frozen.features == "auto" and self.evaluation.protocol == "lomo":
            raise ValueError('frozen.features = "auto" is not available under the lomo protocol; choose "last" or "stages"')
        return self


def _format_validation_error(path: Path, err: ValidationError, origins: dict[tuple, Path] | None = None) -> str:
    """One error line per field, under the file that holds it: `origins` maps each key (a tuple of names) to the
    file of a `base` chain that set it; a field none of them set is `path`'s."""
    by_file: dict[Path, list[str]] = {}
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            line = f"unknown field '{field}': remove it or check its spelling"
        else:
            line = f"field '{field}': {e['msg']} (got {e.get('input')!r})"
        by_file.setdefault(_origin(e["loc"], origins or {}, path), []).append(line)
    files = list(by_file)  # in the schema's order of their first bad field
    if len(files) == 1:
        lines = [f"{files[0]}: invalid configuration", *(f"  - {ln}" for ln in by_file[files[0]])]
    else:
        lines = [f"invalid configuration in {len(files)} files", *(f"  - {f}: {ln}" for f in files for ln in by_file[f])]
    fix = "Fix the override" if str(path).startswith("--set") or str(path) == "override" else "Fix the file" if len(files) == 1 else "Fix the files"
    lines.append(f"{fix} and run again; `cellmorph run --help` lists the sections.")
    return "\n".join(lines)


def _origin(loc: tuple, origins: dict[tuple, Path], default: Path) -> Path:
    """The file that set the longest prefix of `loc` (a field's path in the config)."""
    for n in range(len(loc), 0, -1):
        if tuple(loc[:n]) in origins:
            return origins[tuple(loc[:n])]
    return default


def parse_config(data: dict, source: Path | str = "<config>", origins: dict[tuple, Path] | None = None) -> ExperimentConfig:
    """Validate a config dict; errors name `source`, or (with `origins`, as `load_config` passes) the file of a
    `base` chain each bad key came from."""
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise CellmorphError(_format_validation_error(Path(source), err, origins)) from None


def apply_overrides(data: dict, overrides: list[str] | dict) -> dict:
    """Apply overrides to a config dict: `dotted.key=value` strings (value in TOML syntax; bare words
    are strings) or a {dotted.key: value} mapping."""
    items = overrides.items() if isinstance(overrides, dict) else [_split_override(o) for o in overrides]
    for key, value in items:
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CellmorphError(f"--set '{key}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def _split_override(item: str) -> tuple[str, object]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise CellmorphError(f"--set '{item}': expected KEY=VALUE, e.g. --set seed=1 or --set evaluation.protocol=lcbo")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def override(cfg: ExperimentConfig, changes: dict, source: str = "override") -> ExperimentConfig:
    """A validated copy of `cfg` with {dotted.key: value} changes: a typo is an error naming the field
    (pydantic's model_copy(update=...) would accept anything).

    Example:
        >>> cfg = override(ExperimentConfig(), {"evaluation.protocol": "lcbo", "seed": 1})
        >>> cfg.evaluation.protocol, cfg.seed
        ('lcbo', 1)
    """
    return parse_config(apply_overrides(cfg.model_dump(mode="json"), changes), source)


def _deep_merge(base: dict, child: dict) -> dict:
    out = dict(base)
    for k, v in child.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "options" else v
    return out


def read_toml(path: Path) -> dict:
    """The TOML of `path` with its `base = "other.toml"` chain merged in (the child wins, key by key;
    a relative base is relative to the file that names it)."""
    return _read_chain(Path(path))[0]


def _keys(data: dict, path: Path, prefix: tuple = ()) -> dict[tuple, Path]:
    """Every key of one file's table (sections and their fields; `options` is one value) -> that file."""
    out = {}
    for k, v in data.items():
        out[(*prefix, k)] = path
        if isinstance(v, dict) and k != "options":
            out.update(_keys(v, path, (*prefix, k)))
    return out


def _read_chain(path: Path, _seen: tuple = ()) -> tuple[dict, dict[tuple, Path]]:
    """read_toml, and which file of the chain set each key (for errors that name the file holding the bad line)."""
    if not path.is_file():
        raise CellmorphError(f"{path}: config file not found. Pass the path of a TOML file, e.g. configs/quickstart.toml.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise CellmorphError(f"{path}: not valid TOML ({err}). Fix the syntax and run again.") from None
    base = data.pop("base", None)
    if base is None:
        return data, _keys(data, path)
    if not isinstance(base, str):
        raise CellmorphError(f"{path}: 'base' must be the path of another config file, e.g. base = \"../tuned/resnet50.toml\".")
    base_path = (path.parent / base).resolve()
    if base_path in _seen:
        raise CellmorphError(f"{path}: base = '{base}' makes a cycle of configs.")
    if not base_path.is_file():
        raise CellmorphError(f"{path}: base = '{base}' not found (looked at {base_path}).")
    base_data, origins = _read_chain(base_path, (*_seen, base_path))
    return _deep_merge(base_data, data), {**origins, **_keys(data, path)}


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, merge (`base`), override (`--set`) and validate a config.

    Errors in the file name the file that holds the bad line (the config or a file of its `base` chain);
    errors that only the overrides cause name `--set`.

    Example:
        >>> cfg = load_config("configs/quickstart.toml", ["seed=1"])
    """
    path = Path(path)
    data, origins = _read_chain(path)
    cfg = parse_config(data, path, origins)
    if not overrides:
        return cfg
    return parse_config(apply_overrides(data, overrides), f"--set {' '.join(overrides)} (on {path})")


def dump_toml(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML (every default written out), for the run folder."""
    return _to_toml(cfg.model_dump(mode="json"))


def toml_value(v) -> str:
    """One TOML value as text (strings quoted, lists and tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v)} to TOML")


def _to_toml(d: dict, prefix: str = "") -> str:
    scalars = [(k, v) for k, v in d.items() if not (isinstance(v, dict) and k != "options")]
    tables = [(k, v) for k, v in d.items() if isinstance(v, dict) and k != "options"]
    out = [f"{k} = {toml_value(v)}" for k, v in scalars]
    for k, v in tables:
        name = f"{prefix}{k}"
        out.append(f"\n[{name}]")
        out.append(_to_toml(v, prefix=name + "."))
    return "\n".join(x for x in out if x != "")
