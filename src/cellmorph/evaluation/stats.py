"""Summary statistics shared by every score that is reported over seeds: mean ± SEM."""

from __future__ import annotations

import math

import numpy as np


def mean_sem(values) -> tuple[float, float | None]:
    """Mean and standard error of the mean (ddof=1) of `values`, None ignored; the SEM is None for a
    single value, and the mean NaN for none.

    >>> mean_sem([0.9, 1.0, 0.95])
    (0.95, 0.028867513459481315)"""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1) / math.sqrt(len(vals))) if len(vals) > 1 else None)
