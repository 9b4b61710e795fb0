"""A run's plan: the config's dataset, model, device, protocol, levels and outputs, validated before
anything is written (cheap: no image decoded), and the environment a run records."""

from __future__ import annotations

from contextlib import contextmanager

import platform
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cellmorph.version import __version__
from cellmorph.config import ExperimentConfig
from cellmorph.data.catalog import load_dataset
from cellmorph.data.table import ImageTable
from cellmorph.errors import CellmorphError
from cellmorph.evaluation.aggregate import available_levels
from cellmorph.evaluation.protocols import get as get_protocol
from cellmorph.evaluation.protocols import check_group, make_folds, protocol_group
from cellmorph.evaluation.splits import Fold, Protocol
from cellmorph.data.store import cache_dir
from cellmorph.io import check_writable
from cellmorph.models.names import INIT_WORDS, check_model_config
from cellmorph.reporting.outputs import check_outputs


def environment(cfg: ExperimentConfig, device) -> dict:
    from importlib.metadata import version

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    if not re.fullmatch(r"[0-9a-f]{40}", commit):  # not a git checkout (e.g. an installed copy)
        commit = ""
    return {
        "cellmorph": __version__,
        "git_commit": commit or None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": version("torch"),
        "timm": version("timm"),
        "numpy": np.__version__,
        "scikit-learn": version("scikit-learn"),
        "device": str(device),
        **device_details(device),
        "seeds": cfg.seed_list,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def device_details(device) -> dict:
    """The GPU's name and torch's threads, when torch is loaded anyway (it is not on a cached frozen run)."""
    if "torch" not in sys.modules:
        return {"device_name": platform.processor() or "cpu"}
    import torch

    name = torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else platform.processor() or "cpu"
    return {"device_name": name, "torch_threads": torch.get_num_threads()}


@dataclass
class Plan:
    """Everything a run needs, validated before anything is written."""

    cfg: ExperimentConfig
    table: ImageTable
    folds: list[Fold]
    excluded: list[dict]
    description: str
    levels: list[str]
    device_setting: str
    classes: list[str] = field(default_factory=list)
    protocol: Protocol | None = None
    _device: object = None

    @property
    def device(self):
        """The torch device, resolved at first use ("auto" needs torch to ask for CUDA)."""
        if self._device is None:
            from cellmorph.models.train import pick_device

            self._device = pick_device(self.device_setting)
        return self._device

    @property
    def resolved_device(self):
        """The device a network ran on, or None when none ran (a cached frozen run)."""
        return self._device

    def reset_device(self) -> None:
        """Resolve the device again at next use (a Ray worker: its own GPU when it has one)."""
        self._device = None


def plan_run(cfg: ExperimentConfig, data_dir: str | Path | None = None, table: ImageTable | None = None) -> Plan:
    """Validate the dataset, model, device, protocol, levels and outputs of `cfg` (cheap: no image decoded)."""
    get_protocol(cfg.evaluation.protocol)
    check_group(cfg.evaluation)  # settings alone: before the dataset is even read
    if table is None:
        table = load_dataset(cfg.dataset.name, data_dir, label=cfg.dataset.label, **cfg.dataset.options)
    if not table.labelled:
        raise CellmorphError(f"{table.source}: the table has no label column '{table.label}'; cross-validation needs labelled rows. "
                             "Load it with the label column (load_dataset(..., label=\"Metadata_...\")), or predict it with a model instead.")
    check_carried_columns(table, {"dataset.label": table.label, "evaluation.group": protocol_group(cfg.evaluation)})
    check_model_config(cfg.model.name, cfg.model.init)
    if cfg.model.init not in INIT_WORDS:  # a weights file: read it now, not in the first fold after the folder is claimed
        from cellmorph.models.factory import read_weights_file  # (torch: needed for this network anyway)

        read_weights_file(Path(cfg.model.init).expanduser())
    check_writable(cache_dir(), "cache")  # the store and features need it: a refusal now, not after claiming --out
    if cfg.device != "auto":  # an explicit device is checked now; "auto" is resolved when a network runs
        from cellmorph.models.train import pick_device

        pick_device(cfg.device)
    protocol = get_protocol(cfg.evaluation.protocol)
    if protocol.frozen_only and cfg.mode != "frozen":
        raise CellmorphError(f"evaluation.protocol = '{cfg.evaluation.protocol}' needs mode = \"frozen\": {protocol.frozen_only}")
    folds, excluded, description = make_folds(table.df, table.label, cfg.evaluation)
    if cfg.evaluation.max_folds:
        folds = folds[: cfg.evaluation.max_folds]
    levels = available_levels(table.df, cfg.evaluation.levels)
    check_outputs(cfg.outputs, table)
    if cfg.execution.backend == "ray":
        from cellmorph.engine.ray_backend import check_ray

        check_ray(cfg.execution)
    return Plan(cfg, table, folds, excluded, description, levels, cfg.device, table.classes, protocol)


def check_carried_columns(table: ImageTable, named: dict[str, str]) -> None:
    """Each column the config names ({config field: column}) must reach the predictions, metrics and bundles, which
    carry the Metadata_* columns: a column of the table without that prefix is refused now, before any image is
    decoded, not after the folds (a name the table lacks is left to the check that names what it has)."""
    for field_name, column in named.items():
        if column and column in table.df.columns and not column.startswith("Metadata_"):
            raise CellmorphError(
                f"{field_name} = '{column}': cellmorph carries only Metadata_* columns into predictions, metrics and model bundles, "
                f"so '{column}' would be lost after the folds. Rename the column '{column}' in {table.source} to 'Metadata_{column}' "
                f"and set {field_name} = \"Metadata_{column}\"."
            )


@contextmanager
def torch_threads(n: int):
    """Run the block on `n` torch threads (0: leave torch's setting), then restore it."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
