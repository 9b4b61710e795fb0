"""Thumbnails for the HTML reports (run report, predict report): small PNGs embedded as data: URIs, so each report
is one self-contained file whose size stays bounded (px-wide PNGs, a bounded number of them per report)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image


def thumbnail(image: np.ndarray, px: int = 96) -> str:
    """A uint8 C x H x W image as a data: URI of a px-wide PNG (1 channel grey; 2 channels as red and green;
    3 as RGB; more: the first 3).

    >>> thumbnail(np.zeros((3, 256, 256), np.uint8), 64)[:22]
    'data:image/png;base64,'"""
    c = image.shape[0]
    if c == 1:
        rgb = image[0]
    else:
        rgb = np.zeros((3, *image.shape[1:]), np.uint8)
        rgb[: min(c, 3)] = image[:3]
        rgb = rgb.transpose(1, 2, 0)
    im = Image.fromarray(np.ascontiguousarray(rgb))
    if max(im.size) < px:  # small patches (nuclei): enlarged, pixels kept sharp
        im = im.resize((px, px), Image.Resampling.NEAREST)
    im.thumbnail((px, px), Image.Resampling.BOX)
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
