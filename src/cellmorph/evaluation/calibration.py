"""Temperature scaling (Guo et al. 2017): one number T per model and level that makes the softmax say how
often it is right. The probabilities p of a unit become p ** (1 / T), renormalised (the softmax of
log p / T): T > 1 softens an over-confident model, T < 1 sharpens an under-confident one. The predicted
class never changes, only how sure the model claims to be.

T is fitted by minimising the negative log-likelihood of the true classes on labelled units the model
never trained on: in a run, for each group (compound, patient) on the OTHER groups' out-of-fold units,
exactly as the conformal evaluation calibrates (so the ECE "after" is an honest, cross-fitted figure);
for a model bundle, on all of its out-of-fold units. Written here rather than taken from a library:
it is a one-dimensional bounded minimisation (scipy), and the libraries that offer it (netcal,
torch-uncertainty) wrap a model or add heavy dependencies.

Example:
    >>> T = fit_temperature(oof_probs, true_idx)
    >>> calibrated = temper(new_probs, T)
"""

from __future__ import annotations

import numpy as np

__all__ = ["cross_fitted", "fit_temperature", "temper"]

EPS = 1e-12  # probabilities are clipped here before the log: a head may give an exact 0
LOG_T_BOUNDS = (-4.0, 4.0)  # T between 0.018 and 55


def temper(probs: np.ndarray, temperature: float) -> np.ndarray:
    """The softmax of log(probs) / temperature, row by row (rows of `probs` sum to 1 or are unnormalised scores
    of an aggregate such as the median over a well's images)."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), EPS, None)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


def _nll(probs: np.ndarray, true_idx: np.ndarray, temperature: float) -> float:
    p = temper(probs, temperature)[np.arange(len(true_idx)), true_idx]
    return float(-np.mean(np.log(np.clip(p, EPS, None))))


def fit_temperature(probs: np.ndarray, true_idx: np.ndarray) -> float:
    """The T that minimises the negative log-likelihood of the true classes (bounded search over log T).

    >>> fit_temperature(np.array([[0.99, 0.01], [0.99, 0.01], [0.01, 0.99], [0.99, 0.01]]), np.array([0, 1, 1, 0])) > 1
    True"""
    from scipy.optimize import minimize_scalar

    probs, true_idx = np.asarray(probs, dtype=np.float64), np.asarray(true_idx)
    if len(probs) == 0:
        return 1.0
    res = minimize_scalar(lambda t: _nll(probs, true_idx, np.exp(t)), bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def cross_fitted(probs: np.ndarray, true_idx: np.ndarray, folds: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each fold's units tempered with the T fitted on the other folds' units. Returns the tempered
    probabilities and the T of each fold (in the order of np.unique(folds)).

    >>> calibrated, temps = cross_fitted(probs, true_idx, compound_of_each_unit)"""
    probs, true_idx, folds = np.asarray(probs, dtype=np.float64), np.asarray(true_idx), np.asarray(folds)
    out = np.empty_like(probs)
    temps = []
    for f in np.unique(folds):
        test = folds == f
        t = fit_temperature(probs[~test], true_idx[~test])
        out[test] = temper(probs[test], t)
        temps.append(t)
    return out, temps
