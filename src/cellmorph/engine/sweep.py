"""A sweep: one config, a grid of overrides, one run folder per grid point, then `summarize` over them.

    cellmorph sweep configs/quickstart.toml --grid model.name=tf_efficientnet_lite0,tf_efficientnet_lite1 \\
        --grid seed=0,1,2 --out runs/sweep --set execution.backend=ray

Each axis other than the seed, model and init (which `summarize` groups by already) is added to the
experiment name of its points, e.g. "quickstart (frozen.C=0.1)", so each setting is one summary row
with its seeds pooled. The points run one after another, each on the config's backend: with Ray, the folds of a point are
tasks of one cluster, started once for the whole sweep. Every point is validated before anything runs;
a rerun of the same command skips the finished points and resumes the unfinished one at its first
missing fold.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from contextlib import nullcontext
from pathlib import Path

from cellmorph.errors import CellmorphError


def parse_grid(items: list[str]) -> list[tuple[str, list]]:
    """`KEY=V1,V2,...` strings as (key, values); values in TOML syntax (bare words are strings), commas inside
    brackets kept (e.g. seeds=[0,1],[2,3]).

    Example:
        >>> parse_grid(["model.name=resnet50,inception_v3", "seed=0,1"])
        [('model.name', ['resnet50', 'inception_v3']), ('seed', [0, 1])]
    """
    grid = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise CellmorphError(f"--grid '{item}': expected KEY=V1,V2,..., e.g. --grid seed=0,1,2 or --grid model.name=resnet50,inception_v3")
        if key in (k for k, _ in grid):
            raise CellmorphError(f"--grid '{item}': {key} is given twice; list all its values in one --grid.")
        values = [_value(v) for v in _split_top_level(raw)]
        if len(set(map(repr, values))) != len(values):
            raise CellmorphError(f"--grid '{item}': a value repeats.")
        grid.append((key, values))
    return grid


def _split_top_level(raw: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in raw:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    if any(not p.strip() for p in parts):
        raise CellmorphError(f"--grid value list '{raw}' has an empty value.")
    return [p.strip() for p in parts]


def _value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def point_name(point: dict) -> str:
    """The run folder of a grid point, e.g. `model.name=resnet50__seed=1` (characters a file name should not hold become _)."""
    text = "__".join(f"{k}={v if not isinstance(v, str) else v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text.replace(" ", ""))


def run_sweep(config: str | Path, grid: list[str], out: str | Path, data_dir: str | Path | None = None, overrides: list[str] | None = None):
    """Run every grid point of `config` into OUT/<point>/ and summarize them into OUT/summary/.

    Returns (run folders, summary table). Example:
        >>> runs, table = run_sweep("configs/quickstart.toml", ["frozen.C=0.1,1.0"], "runs/sweep-C")
    """
    from cellmorph.config import load_config
    from cellmorph.engine.runner import run_experiment
    from cellmorph.progress import console
    from cellmorph.reporting.summary import summarize_runs

    out = Path(out)
    axes = parse_grid(grid)
    if not axes:
        raise CellmorphError("give at least one --grid KEY=V1,V2,..., e.g. --grid seed=0,1,2")
    points = [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*[v for _, v in axes])]
    # Validate every point first: a typo in the last value must not surface after hours of the first ones.
    cfgs = [_named(load_config(config, list(overrides or []) + [f"{k}={_toml(v)}" for k, v in p.items()]), p) for p in points]
    backends = {(c.execution.backend, c.execution.address, c.execution.num_cpus) for c in cfgs}
    if len(backends) > 1:
        raise CellmorphError("the grid changes [execution]: every point of a sweep runs on the same backend; set it with --set, not --grid.")
    session = nullcontext()
    if cfgs[0].execution.backend == "ray":
        from cellmorph.engine.ray_backend import ray_session

        session = ray_session(cfgs[0].execution)  # one cluster for the whole sweep
    runs = []
    with session:
        for k, (point, cfg) in enumerate(zip(points, cfgs)):
            folder = out / point_name(point)
            console.print(f"[bold]sweep point {k + 1}/{len(points)}[/]: {', '.join(f'{a}={b}' for a, b in point.items())} -> {folder}")
            m = run_experiment(cfg, folder, data_dir)
            console.print(f"  {m.summary_line()}")
            runs.append(folder)
    table = summarize_runs(runs, out / "summary")
    return runs, table


# What `summarize` groups runs by already (seeds are pooled within a group); any other grid axis goes into the
# experiment name, so that each setting is its own row of the summary.
_IN_GROUP_KEY = ("seed", "seeds", "name", "model.name", "model.init")


def _named(cfg, point: dict):
    from cellmorph.config import override

    label = ", ".join(f"{k}={v}" for k, v in point.items() if k not in _IN_GROUP_KEY)
    return override(cfg, {"name": f"{cfg.name} ({label})"}, "--grid") if label else cfg


def _toml(v) -> str:
    from cellmorph.config import toml_value

    return toml_value(v)
