"""Extra outputs of a run folder, registered in one place: `outputs = ["NAME", ...]` in a config.

Every run folder gets metrics.json, predictions.parquet, confusion.png and report.html; an output
registered here adds files computed from the finished run. To add one: write a function
`fn(out, cfg, table, predictions, metrics)` and `register_output(NAME, fn, needs=(columns...))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from cellmorph.errors import CellmorphError
from cellmorph.storage import RUN


@dataclass(frozen=True)
class Output:
    write: Callable
    needs: tuple[str, ...] = ()  # columns the dataset must have
    description: str = ""
    files: tuple[str, ...] = ()  # the files it writes into the run folder


OUTPUTS: dict[str, Output] = {}


def register_output(name: str, write: Callable, needs: tuple[str, ...] = (), description: str = "", files: tuple[str, ...] = ()) -> None:
    """Make `outputs = [name]` available. `files` join the run folder's layout (storage.RUN): a claim of the
    folder knows them as cellmorph's, the cleanup removes their temporaries, and report.html shows the plots."""
    OUTPUTS[name] = Output(write, needs, description, files)
    RUN.add_files(*files)


def check_outputs(names: list[str], table) -> None:
    """Before any work: every output is known and the data hold what it needs."""
    for name in names:
        if name not in OUTPUTS:
            raise CellmorphError(f"outputs: unknown output '{name}'; known: {sorted(OUTPUTS)}.")
        missing = [c for c in OUTPUTS[name].needs if c not in table.df.columns]
        if missing:
            raise CellmorphError(f"outputs: '{name}' needs the column(s) {missing}, which dataset '{table.name}' lacks.")


def write_outputs(names: list[str], out: Path, cfg, table, pred: pd.DataFrame, metrics) -> None:
    for name in names:
        OUTPUTS[name].write(out, cfg, table, pred, metrics)


def _dose_response(out: Path, cfg, table, pred: pd.DataFrame, metrics) -> None:
    """Per well: the mean crop probability of the positive class, averaged over the seeds; then the
    4PL fit and Z' per dose series, and the Fig-4-like accuracy plot (translocation.py)."""
    from cellmorph.data.datasets.translocation import POSITIVE
    from cellmorph.reporting.doseresponse import write_dose_response

    meta = [c for c in ("Metadata_Well", "Metadata_Row", "Metadata_Column", "Metadata_Dose", "Metadata_Concentration", "Metadata_Control",
                        "Metadata_Compound", "Metadata_CellLine", "Metadata_Fold") if c in pred.columns]
    per_seed = pred.groupby(meta + (["seed"] if "seed" in pred.columns else []), as_index=False)[f"prob_{POSITIVE}"].mean()
    wells = per_seed.groupby(meta, as_index=False)[f"prob_{POSITIVE}"].mean().rename(columns={f"prob_{POSITIVE}": "p_translocated"})
    setting = "pretrained" if cfg.model.init == "imagenet" else f"scratch ({cfg.model.init})"
    dose = write_dose_response(out, wells, metrics.curve, table.name, setting, cfg.finetune.eval_epochs)
    metrics.context["dose_response"] = {k: v for k, v in dose.items() if k != "series"} | {
        "series": {k: {"x50": v["fit_4pl"].get("x50"), "z_prime": v["z_prime"]} for k, v in dose["series"].items()}}


register_output("dose_response", _dose_response, needs=("Metadata_Dose", "Metadata_Control", "Metadata_Well"),
                files=("dose_response.json", "dose_response.png", "fig4.png"),
                description="translocation plates: 4PL dose-response and Z' per dose series, Fig-4-like accuracy per epoch")
