"""What screeners read off a plate: a 4-parameter logistic dose-response fit (EC50) and the Z'-factor.

    response(x) = bottom + (top - bottom) / (1 + 10 ** ((x50 - x) * hill))

`x` is the position on a logarithmic dose axis: log10(concentration) when concentrations are known
(then EC50 = 10 ** x50), or the dose step of a dilution series (BBBC013's metadata gives only the dose
index 0-10; then x50 is a step, e.g. 5.3 = between the 5th and 6th dose).

Z' (Zhang, Chung & Oldenburg 1999) = 1 - 3 (sd_pos + sd_neg) / |mean_pos - mean_neg|, with sample standard
deviations (ddof = 1) over control wells: > 0.5 an excellent assay, 0-0.5 marginal, < 0 unusable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


def logistic4(x, bottom: float, top: float, x50: float, hill: float):
    return bottom + (top - bottom) / (1.0 + 10.0 ** ((x50 - np.asarray(x, dtype=float)) * hill))


@dataclass
class Fit4PL:
    bottom: float
    top: float
    x50: float
    hill: float
    r2: float
    n: int
    converged: bool

    def as_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def fit_logistic4(x, y) -> Fit4PL:
    """Least-squares 4PL fit of responses y at log-dose positions x (several y per x are fine)."""
    from scipy.optimize import curve_fit

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if len(x) < 4 or len(np.unique(x)) < 4:
        raise ValueError("a 4-parameter fit needs at least 4 distinct doses")
    span = float(x.max() - x.min()) or 1.0
    p0 = [float(y.min()), float(y.max()), float(np.median(x)), 4.0 / span]
    lo = [float(y.min()) - abs(np.ptp(y)) - 1e-9, float(y.min()) - abs(np.ptp(y)) - 1e-9, float(x.min()) - span, -50.0]
    hi = [float(y.max()) + abs(np.ptp(y)) + 1e-9, float(y.max()) + abs(np.ptp(y)) + 1e-9, float(x.max()) + span, 50.0]
    try:
        p, _ = curve_fit(logistic4, x, y, p0=p0, bounds=(lo, hi), maxfev=20000)
        converged = True
    except (RuntimeError, ValueError):
        p, converged = np.array(p0), False
    resid = y - logistic4(x, *p)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return Fit4PL(float(p[0]), float(p[1]), float(p[2]), float(p[3]), r2, len(x), converged)


def z_prime(positive, negative) -> float:
    """Z'-factor between positive and negative control readouts (e.g. per-well translocation probabilities)."""
    pos = np.asarray(positive, dtype=float)
    neg = np.asarray(negative, dtype=float)
    if len(pos) < 2 or len(neg) < 2:
        raise ValueError("Z' needs at least 2 positive and 2 negative control wells")
    gap = abs(pos.mean() - neg.mean())
    if gap == 0:
        return float("-inf")
    return float(1.0 - 3.0 * (pos.std(ddof=1) + neg.std(ddof=1)) / gap)
