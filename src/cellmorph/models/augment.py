"""The paper's augmentations as batched tensor ops (any device): 8 dihedral transforms,
per-channel intensity jitter, 3x3 blur and Gaussian noise; for H&E, stain jitter in HED space. `augment` takes a uint8 B x C x H x W
batch and returns float in [0, 1]. No per-sample Python, and no host-to-device copy per call: every
random choice is a tensor drawn on the batch's device, and the blur kernel is cached per device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from cellmorph.config import AugmentConfig
from cellmorph.errors import CellmorphError

# Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB; columns: R, G, B), as scikit-image's
# rgb_from_hed; optical density OD = -ln(I) per channel (natural units, as the HEDJitter transforms that follow
# Tellez et al.), stain densities = OD @ its inverse.
RGB_FROM_HED = ((0.65, 0.70, 0.29), (0.07, 0.99, 0.11), (0.27, 0.57, 0.78))


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


@functools.lru_cache(maxsize=None)
def _hed_matrices(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rgb_from_hed = torch.tensor(RGB_FROM_HED, dtype=torch.float64)
    return rgb_from_hed.to(device, dtype), torch.linalg.inv(rgb_from_hed).to(device, dtype)


def hed_jitter(x: torch.Tensor, sigma: float, generator: torch.Generator | None = None,
               alpha: torch.Tensor | None = None, beta: torch.Tensor | None = None) -> torch.Tensor:
    """H&E stain augmentation (Tellez et al. 2018) of a float RGB batch in [0, 1]: colour deconvolution into
    haematoxylin, eosin and DAB densities, each scaled by alpha ~ U(1-sigma, 1+sigma) and shifted by
    beta ~ U(-sigma, sigma) per image (or the given B x 3 `alpha`, `beta`), and back to RGB. With alpha = 1 and
    beta = 0 it returns the batch unchanged (up to float rounding).

    >>> hed_jitter(torch.rand(4, 3, 32, 32), 0.05).shape
    torch.Size([4, 3, 32, 32])"""
    if x.shape[1] != 3:
        raise CellmorphError(f"finetune.augment.hed_jitter = {sigma:g} needs RGB (3-channel) images; these have {x.shape[1]} channels. "
                             "Set finetune.augment.hed_jitter = 0 for fluorescence data.")
    b = x.shape[0]
    if alpha is None or beta is None:
        u = torch.rand((2, b, 3), device=x.device, generator=generator, dtype=x.dtype) * 2 - 1
        alpha, beta = 1 + sigma * u[0], sigma * u[1]
    rgb_from_hed, hed_from_rgb = _hed_matrices(x.device, x.dtype)
    od = -torch.log(x.clamp_min(1e-6))  # B x 3 x H x W, per RGB channel
    stains = torch.einsum("bchw,cs->bshw", od, hed_from_rgb)
    stains = stains * alpha[:, :, None, None] + beta[:, :, None, None]
    od = torch.einsum("bshw,sc->bchw", stains, rgb_from_hed)
    return torch.exp(-od).clamp_(0, 1)


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
    if cfg.hed_jitter > 0:
        x = hed_jitter(x.clamp_(0, 1), cfg.hed_jitter, generator)
    x = random_blur(x, cfg.blur_p, generator)
    x = gaussian_noise(x, cfg.noise_std, generator)
    return x.clamp_(0, 1)
