"""Monte Carlo dropout (Gal & Ghahramani 2016) for a fine-tuned network, and the seeded block it runs in.

Example:
    >>> mean, std = mc_dropout_proba(net, spec, images, passes=20, device=torch.device("cpu"), batch=64, seed=0)
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from cellmorph.errors import CellmorphError
from cellmorph.models.train import InputSpec, resize_uint8_stack

DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextmanager
def seeded(device: torch.device, seed: int):
    """Seed torch's RNG for the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def mc_dropout_proba(net: nn.Module, spec: InputSpec, x: torch.Tensor, passes: int, device: torch.device, batch: int,
                     seed: int | None, drop_rate: float = 0.0, source: str = "this model", on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the softmax over `passes` forward passes of uint8 images `x` with dropout
    active and every batch norm in eval mode. Seeded by `seed` (None: the caller's seeding, e.g. one `seeded`
    block around a whole stream). A network with no dropout is refused: every pass would give one answer."""
    net = net.to(device)
    if not (drop_rate > 0 or any(isinstance(m, DROPOUT) and m.p > 0 for m in net.modules())):
        raise CellmorphError(f"{source}: the model has no dropout (model.drop_rate = 0), so MC dropout would repeat one answer. "
                             "Fine-tune with model.drop_rate > 0 (e.g. 0.2), or predict without --mc-dropout.")
    x = resize_uint8_stack(x.to(device), spec.size)
    runs = []
    with seeded(device, seed) if seed is not None else nullcontext(), torch.inference_mode():
        net.train()  # timm applies its head dropout when the model is training; every batch norm stays in eval mode
        for m in net.modules():
            if isinstance(m, BATCH_NORM):
                m.eval()
        try:
            for _ in range(passes):
                out = []
                for s in range(0, len(x), batch):
                    chunk = spec(x[s : s + batch].float().div_(255))
                    out.append(net(chunk).float().softmax(dim=1).cpu())
                    if on_batch is not None:
                        on_batch(len(chunk))
                runs.append(torch.cat(out))
        finally:
            net.eval()
    stack = torch.stack(runs).double()
    return stack.mean(0).numpy().astype(np.float32), stack.std(0, unbiased=passes > 1).numpy().astype(np.float32)
