"""Finding catalog logos in photos by their silhouette and colour: template matching, coarse to fine.

A logo reference (a mark on a plain background, as brands upload them) is reduced to its *silhouette*
(the pixels that differ from the background) and its *colour* (their median). In a photo, each logo is
looked for at every scale from ``min_width`` to ``max_width`` of the photo's long side with two
scores that must agree:

* **colour shape** — the normalised cross-correlation between the silhouette and the photo's closeness to
  the logo's colour (a Gaussian of the RGB distance): high where the pixels of the logo's colour form the
  logo's shape and the pixels around it do not;
* **edge alignment** — the mean agreement of the photo's gradient orientation with the silhouette's along
  the silhouette's edges (orientation doubled, so a dark mark on light and a light mark on dark agree):
  high where the photo has edges exactly where the mark has them.

Either alone is fooled (any dark region has a black logo's colour; round fruit has a circle's edges); the
product of the two is not, on the benchmark of ``scripts/eval_detection.py``. A pasted logo scores
0.3-0.6, photos without it up to ~0.3 (``docs/quality.md``, "Logo templates").

Cost: the colour-shape search runs on a 160 px copy of the photo at every scale (one correlation per logo
and scale, skipped where the photo has too few pixels of the logo's colour for the mark at that scale);
the best position in each of ``candidates`` bands of neighbouring scales is then re-scored at ``work_side``
(320 px) in a small window over three neighbouring scales, with both scores. The cost grows linearly with
the number of logos (8-12 ms each here), which is why scoring runs it as a cascade by default, and for
a large catalog only for the logos of the brands a listing is already tied to.

Limits: one colour per logo (a multi-coloured logo is matched on its dominant colour's pixels plus the
rest of its silhouette); no rotation beyond a few degrees; a recoloured mark (a brand's logo printed in
another colour) is found only through its edges, which alone do not reach the scores above; marks
smaller than ``min_width`` of the photo are not looked for; a mark cut by the photo's border is
scored on its visible part.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Collection, Iterable
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt

from service.domain.model import Box, RGBImage
from service.domain.ports import LocatedLogo

Floats = npt.NDArray[np.float32]

_PAD = 3  # background margin around a template: the colour score needs the mark's surroundings
_MIN_COARSE_LONG, _MIN_COARSE_SHORT = 12, 3  # a mark's sides at the coarse level; smaller say nothing
_MIN_FINE_EDGES = 10


@dataclass(frozen=True, slots=True)
class Silhouette:
    """A logo reduced to what template matching needs: its mark (1 inside, 0 outside, cropped to the
    mark's bounding box, at most 160 px on its long side) and its colour (RGB)."""

    mask: Floats
    colour: Floats


def silhouette(pixels: RGBImage, *, background_tolerance: float = 30.0,
               mark_threshold: float = 60.0) -> Silhouette | None:
    """The silhouette of a logo on a plain background, or None where the image is not one: its border
    is not one colour (a product photo, a logo on a scene), or the mark is a speck or fills the image."""
    img = np.asarray(pixels, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 16:
        return None
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    if np.mean(np.linalg.norm(border - background, axis=1) <= background_tolerance) < 0.6:
        return None
    mark = np.linalg.norm(img - background, axis=2) > mark_threshold
    ys, xs = np.nonzero(mark)
    if len(ys) < 32:
        return None
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    if min(y1 - y0, x1 - x0) < 4:
        return None
    cropped = mark[y0:y1, x0:x1].astype(np.float32)
    if not 0.02 <= float(cropped.mean()) <= 0.98:
        return None
    colour = np.median(img[ys, xs], axis=0).astype(np.float32)
    long_side = max(cropped.shape)
    if long_side > 160:
        f = 160 / long_side
        size = (max(1, round(cropped.shape[1] * f)), max(1, round(cropped.shape[0] * f)))
        cropped = cv2.resize(cropped, size, interpolation=cv2.INTER_AREA)
    return Silhouette(np.ascontiguousarray(cropped), colour)


def _f32(a: object) -> Floats:
    return np.asarray(a, dtype=np.float32)


def _template(mask: Floats, long_side: float) -> Floats:
    """The silhouette resized so its long side is ``long_side`` px, with a ``_PAD`` px margin."""
    h, w = mask.shape
    f = long_side / max(h, w)
    size = (max(2, round(w * f)), max(2, round(h * f)))
    t = cv2.resize(mask, size, interpolation=cv2.INTER_AREA)
    return np.pad(t, _PAD).astype(np.float32)


def _doubled_orientation(gray: Floats) -> tuple[Floats, Floats, Floats]:
    """cos 2θ, sin 2θ of the gradient direction θ at every pixel, and the gradient magnitude. Doubling
    the angle makes a light-to-dark edge agree with a dark-to-light one."""
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    mag2 = gx * gx + gy * gy + 1e-6
    return _f32((gx * gx - gy * gy) / mag2), _f32(2 * gx * gy / mag2), _f32(np.sqrt(mag2))


def _closeness(planes: Floats, colour: Floats, sigma: float) -> Floats:
    """exp(-d² / 2σ²) of every pixel's RGB distance d to ``colour``; ``planes`` is the image as (3, h, w)."""
    d2 = (planes[0] - colour[0]) ** 2
    d2 += (planes[1] - colour[1]) ** 2
    d2 += (planes[2] - colour[2]) ** 2
    d2 *= np.float32(-0.5 / (sigma * sigma))
    return _f32(np.exp(d2, out=d2))


@dataclass(frozen=True, slots=True)
class _Template:
    """A silhouette at one size, zero-mean (so correlating with it ignores a window's mean), with its norm."""

    zero_mean: Floats
    norm: float

    @classmethod
    def of(cls, t: Floats) -> _Template:
        t0 = (t - t.mean()).astype(np.float32)
        return cls(t0, float(np.sqrt(np.sum(t0 * t0))))

    @property
    def shape(self) -> tuple[int, int]:
        return self.zero_mean.shape


def _integrals(field: Floats) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Integral images of ``field`` and of its square (float64: sums of squares over large windows)."""
    s1, s2 = cv2.integral2(field, sdepth=cv2.CV_64F)[:2]
    return np.asarray(s1, np.float64), np.asarray(s2, np.float64)


def _ncc(field: Floats, template: _Template, min_std: float,
         sums: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]] | None = None) -> Floats:
    """Normalised cross-correlation of ``template`` at every position of ``field`` (top-left anchored,
    like ``cv2.matchTemplate``), 0 where the window of ``field`` is (nearly) flat: there the correlation
    is noise over noise, and OpenCV's own normalisation answers 1 or 0 there."""
    h, w = template.shape
    num = _f32(cv2.matchTemplate(field, template.zero_mean, cv2.TM_CCORR))
    if template.norm <= 1e-6:
        return np.zeros_like(num)
    s1, s2 = sums if sums is not None else _integrals(field)
    n = h * w
    win1 = s1[h:, w:] - s1[:-h, w:] - s1[h:, :-w] + s1[:-h, :-w]
    win2 = s2[h:, w:] - s2[:-h, w:] - s2[h:, :-w] + s2[:-h, :-w]
    var = (win2 - win1 * win1 / n).astype(np.float32)
    flat = var <= (min_std * min_std) * n
    var[flat] = 1.0
    num /= np.sqrt(var) * np.float32(template.norm)
    num[flat] = 0.0
    return num


@dataclass(frozen=True, slots=True)
class _Candidate:
    scale: float  # the mark's long side as a fraction of the photo's long side
    cy: float  # the template's centre at the coarse level
    cx: float
    score: float


class TemplateLogoLocator:
    """Catalog logos as silhouettes; :meth:`locate` finds them in a photo (see the module docstring)."""

    def __init__(self, *, work_side: int = 320, min_width: float = 0.08, max_width: float = 0.5,
                 scale_step: float = 1.1, colour_sigma: float = 50.0, candidates: int = 4,
                 min_score: float = 0.2) -> None:
        if not 0 < min_width < max_width <= 1:
            raise ValueError(f"need 0 < min_width < max_width <= 1, got {min_width}, {max_width}")
        if scale_step <= 1.0:
            raise ValueError(f"scale_step must be > 1, got {scale_step}")
        if work_side < 64 or candidates < 1 or colour_sigma <= 0:
            raise ValueError("work_side must be >= 64, candidates >= 1 and colour_sigma > 0")
        self.work_side = work_side
        self.coarse_side = work_side // 2
        n = math.floor(math.log(max_width / min_width) / math.log(scale_step)) + 1
        self.scales = [min_width * scale_step**i for i in range(n)]
        self.scale_step = scale_step
        self.colour_sigma = colour_sigma
        self.candidates = candidates
        self.min_score = min_score
        self._logos: dict[int, Silhouette] = {}
        # Coarse templates by logo, one per scale (None where too small): ~150 KB a logo.
        self._coarse: dict[int, list[_Template | None]] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ references

    def add(self, image_id: int, pixels: RGBImage) -> bool:
        """Index a logo reference; False (and nothing indexed) where it is not a mark on a plain
        background."""
        found = silhouette(pixels)
        if found is None:
            return False
        coarse: list[_Template | None] = []
        for s in self.scales:
            t = _template(found.mask, s * self.coarse_side)
            mark = (t.shape[0] - 2 * _PAD, t.shape[1] - 2 * _PAD)
            coarse.append(_Template.of(t) if max(mark) >= _MIN_COARSE_LONG and min(mark) >= _MIN_COARSE_SHORT
                          else None)
        with self._lock:
            self._logos[image_id] = found
            self._coarse[image_id] = coarse
        return True

    def remove(self, image_ids: Iterable[int]) -> int:
        with self._lock:
            gone = [i for i in image_ids if self._logos.pop(i, None) is not None]
            for i in gone:
                self._coarse.pop(i, None)
        return len(gone)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._logos

    def __len__(self) -> int:
        return len(self._logos)

    # ------------------------------------------------------------------ photos

    def locate(self, pixels: RGBImage, only: Collection[int] | None = None) -> list[LocatedLogo]:
        """The logos found in a photo, best first: one per logo, scored in [0, 1], at least
        ``min_score``, with its box in the photo's pixels. ``only``: look for these logos alone."""
        with self._lock:
            logos = (dict(self._logos) if only is None
                     else {i: self._logos[i] for i in only if i in self._logos})
            coarse = {i: self._coarse[i] for i in logos}
        if not logos:
            return []
        img = np.asarray(pixels)
        h0, w0 = img.shape[:2]
        fine = _FineView(_resized(img, self.work_side))
        # The maps searched are padded by _PAD with "not the colour" and "no edge", so a padded template
        # can sit over a mark that touches the photo's border; positions are in padded pixels until the box.
        coarse_size = (max(1, (fine.img.shape[1] + 2 * _PAD) // 2), max(1, (fine.img.shape[0] + 2 * _PAD) // 2))
        found: list[LocatedLogo] = []
        for image_id, logo in logos.items():
            # Closeness at the fine level, then averaged down: a thin line of the logo's colour stays
            # partly close at the coarse level, where resizing the photo first would blend it away.
            close = np.pad(_closeness(fine.planes, logo.colour, self.colour_sigma), _PAD)
            small = _f32(cv2.resize(close, coarse_size, interpolation=cv2.INTER_AREA))
            cands = self._coarse_candidates(logo, coarse[image_id], small)
            if not cands:
                continue
            best = max((self._refine(c, logo, fine, close) for c in cands), key=lambda r: r[0])
            score, box = best
            if score >= self.min_score and box is not None:
                f = max(h0, w0) / max(fine.img.shape[:2])
                x0, y0, x1, y1 = (v - _PAD for v in box)
                found.append(LocatedLogo(image_id, score, (
                    max(0, int(x0 * f)), max(0, int(y0 * f)), min(w0, math.ceil(x1 * f)), min(h0, math.ceil(y1 * f)))))
        found.sort(key=lambda r: (-r.score, r.image_id))
        return found

    def _coarse_candidates(self, logo: Silhouette, templates: list[_Template | None],
                           close: Floats) -> list[_Candidate]:
        """The coarse level's best positions for one logo, from its colour closeness map ``close``."""
        n_close = float(np.count_nonzero(close > 0.5))
        mark_share = float(logo.mask.mean())
        per_scale: list[_Candidate] = []
        sums = _integrals(close)
        for s, t in zip(self.scales, templates, strict=True):
            if t is None or t.shape[0] >= close.shape[0] or t.shape[1] >= close.shape[1]:
                continue
            # The mark at this scale covers this many pixels; a photo with under a fifth of that many
            # pixels of its colour has no logo this big (and none bigger: the scales only grow). A fifth,
            # not all: thin lines blend with their surroundings at the coarse level (BMW's ring keeps ~35 %).
            mark_pixels = mark_share * (t.shape[0] - 2 * _PAD) * (t.shape[1] - 2 * _PAD)
            if n_close < 0.2 * mark_pixels:
                break
            ncc = _ncc(close, t, 0.1, sums)
            y, x = np.unravel_index(int(np.argmax(ncc)), ncc.shape)
            per_scale.append(_Candidate(s, y + t.shape[0] / 2, x + t.shape[1] / 2,
                                        float(ncc[y, x])))
        # The best position of each band of neighbouring scales (``candidates`` bands), best first: a thin
        # line-art mark blurs at the coarse level, so its true scale may not hold the overall best.
        picked: list[_Candidate] = []
        bands = np.array_split(np.arange(len(per_scale)), min(self.candidates, len(per_scale)) or 1)
        for band in bands:
            if len(band):
                best = max((per_scale[i] for i in band), key=lambda c: c.score)
                # The final score is at most the fine colour score, which a coarse 0.25 rarely exceeds
                # by the 0.05 needed to reach the logo ramp's floor (0.30): a heuristic cut, not a bound.
                if best.score > 0.25:
                    picked.append(best)
        picked.sort(key=lambda c: -c.score)
        return picked

    def _refine(self, c: _Candidate, logo: Silhouette, fine: _FineView,
                close_fine: Floats) -> tuple[float, Box | None]:
        """Both scores at the fine level, in a window around the coarse position, at three scales."""
        long_side = max(fine.img.shape[:2])
        height, width = close_fine.shape  # padded
        factor = 2.0  # the coarse level is the fine one halved
        best: tuple[float, Box | None] = (0.0, None)
        for s in (c.scale / self.scale_step, c.scale, c.scale * self.scale_step):
            t = _template(logo.mask, s * long_side)
            th, tw = t.shape
            if th >= height or tw >= width:
                continue
            top, left = c.cy * factor - th / 2, c.cx * factor - tw / 2
            margin = 6
            y0, x0 = max(0, int(top) - margin), max(0, int(left) - margin)
            y1, x1 = min(height, int(top) + th + margin), min(width, int(left) + tw + margin)
            if y1 - y0 < th or x1 - x0 < tw:
                continue
            ncc = _ncc(np.ascontiguousarray(close_fine[y0:y1, x0:x1]), _Template.of(t), 0.1)
            kc, ks = _edge_kernels(t)
            if kc is None or ks is None:
                continue
            cos2, sin2 = fine.orientation
            edges = (cv2.matchTemplate(cos2[y0:y1, x0:x1], kc, cv2.TM_CCORR)
                     + cv2.matchTemplate(sin2[y0:y1, x0:x1], ks, cv2.TM_CCORR))
            score = np.clip(ncc, 0, 1) * np.clip(edges, 0, 1)
            y, x = np.unravel_index(int(np.argmax(score)), score.shape)
            if float(score[y, x]) > best[0]:
                by, bx = y0 + int(y) + _PAD, x0 + int(x) + _PAD
                best = (float(score[y, x]), (bx, by, bx + tw - 2 * _PAD, by + th - 2 * _PAD))
        return best


def _edge_kernels(template: Floats) -> tuple[Floats | None, Floats | None]:
    """The silhouette's edge orientations as two correlation kernels, each edge pixel weighted 1/n so the
    correlation is the mean agreement along the edges."""
    c, s, mag = _doubled_orientation(_f32(cv2.GaussianBlur(template, (3, 3), 0.8)))
    edge = mag > 0.25 * float(mag.max())
    n = int(np.count_nonzero(edge))
    if n < _MIN_FINE_EDGES:
        return None, None
    return (c * edge / n).astype(np.float32), (s * edge / n).astype(np.float32)


class _FineView:
    """A photo at the fine level: pixels, and (made on first use: a photo with no candidate never needs
    it) its doubled gradient orientation, weighted by a saturating gradient strength (faint texture
    counts less than a printed edge) and blurred a little (JPEG and resampling move edges by a pixel),
    padded by ``_PAD`` with zeros like the closeness maps."""

    def __init__(self, img: Floats) -> None:
        self.img = img
        self.planes = np.ascontiguousarray(img.transpose(2, 0, 1))
        self._orientation: tuple[Floats, Floats] | None = None

    @property
    def orientation(self) -> tuple[Floats, Floats]:
        if self._orientation is None:
            c, s, mag = _doubled_orientation(self.img.mean(axis=2).astype(np.float32))
            weight = np.minimum(mag / 40.0, 1.0)
            self._orientation = (np.pad(_f32(cv2.GaussianBlur(c * weight, (3, 3), 0.7)), _PAD),
                                 np.pad(_f32(cv2.GaussianBlur(s * weight, (3, 3), 0.7)), _PAD))
        return self._orientation


def _resized(img: npt.NDArray[np.uint8] | Floats, long_side: int) -> Floats:
    """``img`` (RGB) scaled so its long side is ``long_side`` (up or down), as float32."""
    h, w = img.shape[:2]
    f = long_side / max(h, w)
    size = (max(1, round(w * f)), max(1, round(h * f)))
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(img), size, interpolation=interp).astype(np.float32)


__all__ = ["Silhouette", "TemplateLogoLocator", "silhouette"]
