"""Perceptual hashes of decoded images: a 64-bit DCT pHash as 16 hex characters, and Hamming distance.

A pHash survives re-encoding, mild resizing and colour tweaks, so it finds exact re-uploads of a photo
cheaply (before any model runs) and lets stored listings be grouped by near-identical photos.  The
content sha256 (see :mod:`service.intake.images`) finds byte-identical files; this finds the rest of
the trivial copies.

Method: area-average down to 32x32, luma, 2-D DCT-II, the 8x8 lowest frequencies, each bit set when its
coefficient is above the median of the 64.  Bit 63 (the most significant) is coefficient (0, 0).
"""

from __future__ import annotations

import re
from functools import cache

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.domain.model import RGBImage

HASH_SIZE = 8  # 8x8 = 64 bits
_SAMPLE = 32  # side the image is reduced to before the DCT
_HEX64 = re.compile(r"^[0-9a-f]{16}$")


@cache
def _dct_matrix(n: int) -> npt.NDArray[np.float64]:
    """The (unnormalised) DCT-II basis: row k holds cos(pi * (2i + 1) * k / 2n) for i in 0..n-1.
    Scale does not matter: only signs relative to the median are kept."""
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def phash(pixels: RGBImage) -> str:
    """The 64-bit DCT perceptual hash of an (H, W, 3) uint8 RGB image, as 16 lower-case hex digits."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ValueError(f"phash needs an (H, W, 3) image, not shape {pixels.shape}")
    # BOX resampling is the plain area average: every source pixel counts, so JPEG noise and small
    # resizes average out instead of aliasing into the low frequencies.  Averaging before taking the luma
    # gives the same result (both are linear) and touches the full-size image only once, in C.
    # reducing_gap lets Pillow do most of the shrink with its fast integer block reduction first.
    small = Image.fromarray(np.ascontiguousarray(pixels)).resize((_SAMPLE, _SAMPLE), Image.Resampling.BOX,
                                                                reducing_gap=2.0)
    grid = np.asarray(small, dtype=np.float64) @ np.array([0.299, 0.587, 0.114])
    dct = _dct_matrix(_SAMPLE)
    coefficients = (dct @ grid @ dct.T)[:HASH_SIZE, :HASH_SIZE].ravel()
    bits = coefficients > np.median(coefficients)
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def hamming(a: str, b: str) -> int:
    """How many of the 64 bits differ between two hashes from :func:`phash` (0 = same, ~32 = unrelated)."""
    for h in (a, b):
        if not isinstance(h, str) or not _HEX64.match(h.lower()):
            raise ValueError(f"not a 16-hex-digit perceptual hash: {h!r}")
    return (int(a, 16) ^ int(b, 16)).bit_count()
