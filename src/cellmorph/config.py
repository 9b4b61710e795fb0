"""Experiment configuration: one TOML file per experiment, validated by pydantic.

Unknown keys are errors (a typo must not silently fall back to a default), and every
error names the file and the field.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cellmorph.errors import CellmorphError


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
    # "imagenet", "xavier", "random", or the path of a weights file.
    init: str = "imagenet"
    # Square input size fed to the network; 0 = the architecture's own (timm pretrained_cfg: 224
    # for ResNet50 and EfficientNet-Lite0, 299 for the Inception models).
    input_size: int = Field(0, ge=0)
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)


class FrozenConfig(_Strict):
    # Average features over the 8 dihedral transforms of each image.
    tta: bool = False
    batch_size: int = Field(32, ge=1)
    # Inverse L2 strength of the logistic-regression head.
    C: float = Field(1.0, gt=0)
    class_weight: Literal["balanced", "none"] = "balanced"


class AugmentConfig(_Strict):
    dihedral: bool = True
    # Per-channel intensity: x * U(1-s, 1+s) + U(-shift, shift), on the 0-1 scale.
    jitter_scale: float = Field(0.1, ge=0)
    jitter_shift: float = Field(0.05, ge=0)
    blur_p: float = Field(0.25, ge=0, le=1)
    noise_std: float = Field(0.02, ge=0)


class FinetuneConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine"] = "constant"
    class_weights: bool = True
    # "imagenet": the model's own mean/std; "raw": 0-255 pixels as the paper's code fed them.
    normalize: Literal["imagenet", "raw"] = "imagenet"
    amp: bool = True
    # torch.compile the model (CUDA; the first epoch pays the compile time).
    compile: bool = False
    # Score the test fold after every epoch: accuracy-vs-epoch curves in metrics.json.
    eval_every_epoch: bool = False
    # Keep each fold's trained weights (folds/NN/model.pt), e.g. for `cellmorph explain`.
    save_models: bool = False
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class EvaluationConfig(_Strict):
    # "loco": leave-one-compound-out; "lcbo": leave-compound-and-batch-out (the test compound and
    # every image of its batch/week are held out of training).
    protocol: Literal["loco", "lcbo"] = "loco"
    # Run only the first N folds (0 = all); for smoke tests and CI.
    max_folds: int = Field(0, ge=0)


class ExperimentConfig(_Strict):
    name: str = "experiment"
    seed: int = 0
    mode: Literal["frozen", "finetune"] = "frozen"
    # "auto" picks CUDA when available.
    device: str = "auto"
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    frozen: FrozenConfig = Field(default_factory=FrozenConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)


def _format_validation_error(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid configuration"]
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - unknown field '{field}': remove it or check its spelling")
        else:
            got = e.get("input")
            lines.append(f"  - field '{field}': {e['msg']} (got {got!r})")
    lines.append("Fix the file and run again; `cellmorph run --help` lists the sections.")
    return "\n".join(lines)


def parse_config(data: dict, source: Path | str = "<config>") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise CellmorphError(_format_validation_error(Path(source), err)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `dotted.key=value` overrides (value in TOML syntax; bare words are strings)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise CellmorphError(f"--set '{item}': expected KEY=VALUE, e.g. --set seed=1 or --set evaluation.protocol=lcbo")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise CellmorphError(f"--set '{item}': '{part}' is not a section")
        node[parts[-1]] = value
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if not path.is_file():
        raise CellmorphError(f"{path}: config file not found. Pass the path of a TOML file, e.g. configs/quickstart.toml.")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise CellmorphError(f"{path}: not valid TOML ({err}). Fix the syntax and run again.") from None
    return parse_config(apply_overrides(data, overrides or []), path)


def dump_toml(cfg: ExperimentConfig) -> str:
    """The resolved config as TOML (every default written out), for the run folder."""
    return _to_toml(cfg.model_dump(mode="json"))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v)} to TOML")


def _to_toml(d: dict, prefix: str = "") -> str:
    scalars = [(k, v) for k, v in d.items() if not (isinstance(v, dict) and k != "options")]
    tables = [(k, v) for k, v in d.items() if isinstance(v, dict) and k != "options"]
    out = [f"{k} = {_toml_value(v)}" for k, v in scalars]
    for k, v in tables:
        name = f"{prefix}{k}"
        out.append(f"\n[{name}]")
        out.append(_to_toml(v, prefix=name + "."))
    return "\n".join(x for x in out if x != "")
