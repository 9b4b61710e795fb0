"""The frozen path's logistic head as a bundle holds it: standardisation (mean, scale) and the linear layer (coef,
intercept), checked on load and applied in float64 so that a saved and reloaded model gives the same bits.

    >>> probs = head_proba(features, check_head(bundle.tensors, n_classes=6, n_features=1280, where="model.safetensors"))
"""

from __future__ import annotations

import numpy as np
import torch

from cellmorph.errors import CellmorphError


def check_head(tensors: dict[str, torch.Tensor], n_classes: int, n_features: int | None, where: str) -> dict[str, torch.Tensor]:
    """The frozen head's tensors (head.mean/scale/coef/intercept) from a bundle, checked against the number of classes
    and the backbone's feature width (`where` names the file in the error), as float64."""
    head = {k: tensors.get(f"head.{k}") for k in ("mean", "scale", "coef", "intercept")}
    absent = [f"head.{k}" for k, v in head.items() if v is None]
    if absent:
        raise CellmorphError(f"{where}: the logistic head is missing ({', '.join(absent)}). Save the model again.")
    d = head["mean"].shape[0]
    want = {"mean": (d,), "scale": (d,), "coef": (n_classes, d), "intercept": (n_classes,)}
    wrong = [f"head.{k} {tuple(head[k].shape)} (expected {s})" for k, s in want.items() if tuple(head[k].shape) != s]
    if n_features is not None and d != n_features:
        wrong.append(f"{d} head features for a backbone of {n_features}")
    if wrong:
        raise CellmorphError(f"{where}: the logistic head does not fit {n_classes} classes: {'; '.join(wrong)}. Save the model again.")
    return {k: v.to(torch.float64) for k, v in head.items()}


def head_proba(features: torch.Tensor, head: dict[str, torch.Tensor]) -> np.ndarray:
    """softmax(standardised features @ coef.T + intercept), in float64: the same bits before and after a save."""
    z = (features.to(torch.float64) - head["mean"]) / head["scale"]
    return torch.softmax(z @ head["coef"].T + head["intercept"], dim=1).numpy().astype(np.float32)
