"""The paper's augmentations as batched tensor ops (any device): 8 dihedral transforms,
per-channel intensity jitter, 3x3 blur and Gaussian noise. `augment` takes a uint8 B x C x H x W
batch and returns float in [0, 1]. No per-sample Python, and no host-to-device copy per call: every
random choice is a tensor drawn on the batch's device, and the blur kernel is cached per device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cellmorph.config import AugmentConfig


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform number k in 0..7: rotate by k % 4 quarter turns, then mirror if k >= 4."""
    y = torch.rot90(x, k % 4, dims=(-2, -1))
    return torch.flip(y, dims=(-1,)) if k >= 4 else y


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random one of the 8 dihedral transforms per sample.

    Every element of the group is an optional transpose, then an optional left-right and an optional
    up-down mirror; three batched `where`s draw them, with no host sync and no per-sample Python.
    (On non-square images the transpose is skipped: then 4 of the 8 are drawn.)
    """
    b = x.shape[0]
    bits = torch.rand((3, b, 1, 1, 1), device=x.device, generator=generator) < 0.5
    if x.shape[-1] == x.shape[-2]:
        x = torch.where(bits[0], x.transpose(-1, -2), x)
    x = torch.where(bits[1], x.flip(-1), x)
    return torch.where(bits[2], x.flip(-2), x)


def blur3x3(x: torch.Tensor) -> torch.Tensor:
    """The binomial 3x3 blur ([1 2 1] outer [1 2 1] / 16), per channel, edges replicated."""
    c = x.shape[1]
    kernel = _blur_kernel(x.device, x.dtype).expand(c, 1, 3, 3)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, groups=c)


@functools.lru_cache(maxsize=None)
def _blur_kernel(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    k1 = torch.tensor([1.0, 2.0, 1.0], dtype=dtype)
    return (torch.outer(k1, k1) / 16).view(1, 1, 3, 3).to(device)


def random_blur(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if p <= 0:
        return x
    mask = torch.rand((x.shape[0], 1, 1, 1), device=x.device, generator=generator) < p
    return torch.where(mask, blur3x3(x), x)


def gaussian_noise(x: torch.Tensor, max_std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if max_std <= 0:
        return x
    std = torch.rand((x.shape[0], 1, 1, 1), device=x.device, generator=generator, dtype=x.dtype) * max_std
    return torch.addcmul(x, torch.randn(x.shape, device=x.device, generator=generator, dtype=x.dtype), std)  # x + std * noise, one pass


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 batch -> augmented float [0, 1] batch, the training hot path.

    Ordered for speed: the dihedral moves run on the 1-byte pixels, and the conversion to float, /255
    and the per-channel jitter x * U(1-s, 1+s) + U(-shift, shift) are one multiply-add that reads the
    uint8 pixels directly (no float copy of the batch first).
    """
    if cfg.dihedral:
        x = random_dihedral(x, generator)
    b, c = x.shape[:2]
    u = torch.rand((2, b, c, 1, 1), device=x.device, generator=generator) * 2 - 1
    scale = (1 + cfg.jitter_scale * u[0]) / 255.0
    shift = cfg.jitter_shift * u[1]
    x = torch.addcmul(shift, x, scale)  # uint8 in, float32 out
    x = random_blur(x, cfg.blur_p, generator)
    x = gaussian_noise(x, cfg.noise_std, generator)
    return x.clamp_(0, 1)
