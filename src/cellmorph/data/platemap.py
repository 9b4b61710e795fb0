"""A plate map: what is in each well (compound, concentration, label, control), joined onto a plate's fields.

A plate map is a CSV with one row per well, a `Metadata_Well` column (A01 or A1; any case) and any other
`Metadata_*` columns; with a `Metadata_Plate` column its rows apply to that plate only, without one to every
plate (the usual case: one layout for all plates of a screen). Control wells are those whose control column
(`Metadata_Compound` by default) holds the control name (`DMSO` by default, any case):

    Metadata_Well,Metadata_Compound,Metadata_Concentration,Metadata_MoA
    B02,DMSO,0,
    B03,taxol,1.0,Microtubule stabilizers

Example:
    >>> fields = pd.DataFrame({"Metadata_Plate": ["P1", "P1"], "Metadata_Well": ["b2", "B03"], "Metadata_Site": [1, 1]})
    >>> pm = pd.DataFrame({"Metadata_Well": ["B02", "B3"], "Metadata_Compound": ["DMSO", "taxol"]})
    >>> join_platemap(fields, pm, "map.csv")["Metadata_Compound"].tolist()
    ['DMSO', 'taxol']
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from cellmorph.errors import CellmorphError

WELL = "Metadata_Well"
PLATE = "Metadata_Plate"
ROLE = "Metadata_Role"  # "control" or "treatment": which fields normalise a plate, which are prepared
_WELL_NAME = re.compile(r"^\s*([A-Za-z]{1,2})\s*0*(\d{1,3})\s*$")


def normalise_well(name: object) -> str:
    """'b3', 'B03', ' B003 ' -> 'B03' (row letters upper case, column two digits); an error for anything else."""
    m = _WELL_NAME.match(str(name))
    if not m:
        raise ValueError(str(name))
    return f"{m.group(1).upper()}{int(m.group(2)):02d}"


def normalise_wells(values: pd.Series, source: str) -> pd.Series:
    out = []
    for i, v in values.items():
        try:
            out.append(normalise_well(v))
        except ValueError:
            raise CellmorphError(f"{source}: row {i}: {v!r} is not a well name (like B03 or B3).") from None
    return pd.Series(out, index=values.index)


def read_platemap(path: str | Path) -> pd.DataFrame:
    """The plate map CSV, wells normalised; errors name the file and what to fix."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CellmorphError(f"{path}: plate map not found (a CSV with Metadata_Well and Metadata_* columns, one row per well).")
    try:
        pm = pd.read_csv(path, dtype={WELL: str, PLATE: str})
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise CellmorphError(f"{path}: cannot be read as CSV ({err}).") from None
    return check_platemap(pm, str(path))


def check_platemap(pm: pd.DataFrame, source: str) -> pd.DataFrame:
    pm = pm.copy()
    pm.columns = [str(c).strip() for c in pm.columns]
    if WELL not in pm.columns:
        raise CellmorphError(f"{source}: the plate map has no {WELL} column (columns: {list(pm.columns)[:8]}). Name the well column {WELL}.")
    other = [c for c in pm.columns if not c.startswith("Metadata_")]
    if other:
        raise CellmorphError(f"{source}: plate map column(s) {other[:5]} lack the Metadata_ prefix; rename them (e.g. Metadata_{other[0]}).")
    pm[WELL] = normalise_wells(pm[WELL], source)
    keys = [PLATE, WELL] if PLATE in pm.columns else [WELL]
    dup = pm.duplicated(keys, keep=False)
    if dup.any():
        raise CellmorphError(f"{source}: well(s) {sorted(set(pm.loc[dup, WELL]))[:5]} are listed more than once; one row per well.")
    return pm


def join_platemap(fields: pd.DataFrame, platemap: pd.DataFrame | str | Path, source: str | None = None) -> pd.DataFrame:
    """`fields` (one row per field: Metadata_Plate, Metadata_Well, ...) with the plate map's columns joined on the
    well (and the plate, when the map has one). Every field's well must be in the map: a missing one is an error
    naming the wells and the map, so no field is silently dropped or left without its treatment."""
    if not isinstance(platemap, pd.DataFrame):
        source = source or str(platemap)
        platemap = read_platemap(platemap)
    else:
        source = source or "plate map"
        platemap = check_platemap(platemap, source)
    fields = fields.copy()
    fields[WELL] = normalise_wells(fields[WELL], "the fields' wells")
    keys = [PLATE, WELL] if PLATE in platemap.columns else [WELL]
    if PLATE in platemap.columns:
        fields[PLATE] = fields[PLATE].astype(str)
    clash = [c for c in platemap.columns if c in fields.columns and c not in keys]
    if clash:
        raise CellmorphError(f"{source}: column(s) {clash} are both in the plate map and in the image table; keep them in one place.")
    merged = fields.merge(platemap, on=keys, how="left", indicator=True, validate="many_to_one")
    missing = merged[merged["_merge"] == "left_only"]
    if len(missing):
        where = missing[[k for k in (PLATE, WELL) if k in missing.columns]].drop_duplicates()
        names = [" ".join(map(str, r)) for r in where.itertuples(index=False)]
        raise CellmorphError(
            f"{source}: no row for {len(where)} well(s) that have images: {names[:6]}. Add those wells to the plate map "
            "(an empty compound for untreated wells), or leave their images out of the image table."
        )
    return merged.drop(columns="_merge")


def mark_controls(fields: pd.DataFrame, controls: str = "DMSO", column: str = "Metadata_Compound", source: str = "plate map") -> pd.DataFrame:
    """Add Metadata_Role: "control" where `column` equals `controls` (any case, spaces ignored), else "treatment".
    Every plate with treatment fields needs control fields (the plate-wise normalisation divides by them)."""
    if column not in fields.columns:
        raise CellmorphError(f"{source}: no column {column} to find the control wells ({controls}) in; name it with --control-column.")
    wanted = str(controls).strip().lower()
    is_control = fields[column].astype(str).str.strip().str.lower() == wanted
    fields = fields.assign(**{ROLE: ["control" if c else "treatment" for c in is_control]})
    roles = fields.groupby(PLATE)[ROLE].agg(set)
    bad = [p for p, r in roles.items() if "treatment" in r and "control" not in r]
    if bad:
        raise CellmorphError(
            f"plate(s) {bad[:5]} have no control wells ({column} = {controls}), so they cannot be normalised per plate. "
            "Name the control with --controls (and --control-column), choose --normalise field, or leave those plates out."
        )
    return fields
